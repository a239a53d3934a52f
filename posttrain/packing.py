"""How sequences sit in the rows of a batch: the blocks of a packed row, and tokens per sequence.

The vocabulary shared by ``data/`` (which lays rows out: :mod:`posttrain.data.collate`) and ``model/``
(which scores them: :mod:`posttrain.model.spans`, :mod:`posttrain.model.logps`), kept here so that neither
of the two imports the other. A row's **spans** are its blocks ``(index, keep)`` in row order: ``index`` (a
LongTensor, or a ``(start, end)`` range) lists the row positions of one causal sequence, and the block writes
its outputs from ``keep`` on (see :mod:`posttrain.model.spans` for the shared-prefix case).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Block = tuple[Tensor | tuple[int, int], int]
RowSpans = Sequence[Block]
Spans = Sequence[RowSpans]
"""Per row of a batch, its blocks in row order."""


def sequence_counts(loss_mask: Tensor, sequence: Tensor | None, num_sequences: int) -> Tensor:
    """Completion tokens of each sequence: row sums when padded, per ``sequence`` id when packed."""
    if sequence is None:
        return loss_mask.sum(-1)
    # index_add into a fixed size: no device read (bincount and boolean indexing both size their output
    # from the data, a synchronisation on a GPU).
    at = (loss_mask.bool() & (sequence >= 0)).reshape(-1)
    out = torch.zeros((num_sequences,), dtype=torch.long, device=sequence.device)
    return out.index_add(0, sequence.clamp(min=0).reshape(-1), at.long())
