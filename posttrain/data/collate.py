"""Records -> batches. The loss mask was fixed at tokenization; here it is only laid out.

Three layouts (config key ``layout``):

* ``padded``: one row per sequence (prompt + one completion), right-padded to the longest.
* ``packed``: every sequence of the micro-batch one after another in ONE row, no padding; positions restart
  for each sequence and span attention (:mod:`posttrain.model.spans`) keeps attention inside it.
* ``shared_prefix``: packed, and a prompt shared by several completions (a pair's chosen and rejected) is
  laid out once: ``[prompt | chosen | last prompt token | rejected]``; the rejected tokens attend to the
  prompt's keys and values, not to the chosen ones.

The log-probs, the losses and their gradients are the same in every layout (tests/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.data.examples import PreferenceRecord
from posttrain.packing import Spans, sequence_counts

LAYOUTS = ("padded", "packed", "shared_prefix")


@dataclass(frozen=True)
class Packed:
    """One packed row: ``input_ids``, ``attention_mask`` (all ones), ``loss_mask``, ``position_ids`` and
    ``sequence`` (the completion each loss-mask token belongs to, -1 elsewhere), each (1, T); ``spans``:
    the row's attention blocks; ``num_sequences``: how many completions it holds."""

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    sequence: Tensor
    spans: Spans
    num_sequences: int


def pack_units(
    units: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    share_prefix: bool,
    sequence_ids: Sequence[Sequence[int]] | None = None,
) -> Packed:
    """Lay out (prompt ids, completions) units in one row, unit after unit, completion after completion.

    Completion ``k`` of unit ``u`` is sequence ``sequence_ids[u][k]``; by default ``k * len(units) + u`` (every
    unit then needs as many completions: a pair's chosen are sequences 0..B-1 and its rejected B..2B-1, as
    in the padded layout).

    >>> p = pack_units([((5, 6), ((7,), (8, 9)))], share_prefix=True)
    >>> p.input_ids, p.position_ids
    (tensor([[5, 6, 7, 6, 8, 9]]), tensor([[0, 1, 2, 1, 2, 3]]))
    >>> p.loss_mask.int(), p.sequence
    (tensor([[0, 0, 1, 0, 1, 1]], dtype=torch.int32), tensor([[-1, -1,  0, -1,  1,  1]]))
    >>> [(i if isinstance(i, tuple) else i.tolist(), keep) for i, keep in p.spans[0]]
    [((0, 3), 0), ([0, 3, 4, 5], 1)]
    >>> pack_units([((5, 6), ((7,), (8, 9)))], share_prefix=False).input_ids
    tensor([[5, 6, 7, 5, 6, 8, 9]])
    """
    ids: list[int] = []
    positions: list[int] = []
    trained: list[bool] = []
    sequence: list[int] = []
    blocks: list[tuple[Tensor | tuple[int, int], int]] = []
    n = len(units)
    if sequence_ids is None:
        branches = {len(c) for _, c in units}
        if len(branches) > 1:
            raise ValueError(f"every unit needs the same number of completions, got {sorted(branches)}")
        sequence_ids = [[k * n + u for k in range(len(c))] for u, (_, c) in enumerate(units)]
    for u, (prompt, completions) in enumerate(units):
        p = len(prompt)
        if p == 0:
            raise ValueError("a completion without a prompt token cannot be scored from its first token")
        prompt_at = -1
        for k, completion in enumerate(completions):
            c = len(completion)
            start = len(ids)
            if k == 0 or not share_prefix:
                prompt_at = start
                ids += [*prompt, *completion]
                positions += range(p + c)
                trained += [False] * p + [True] * c
                sequence += [-1] * p + [sequence_ids[u][k]] * c
                blocks.append(((start, start + p + c), 0))
            else:  # the prompt's last token again, then the completion, attending to the prompt laid out before
                ids += [prompt[-1], *completion]
                positions += range(p - 1, p + c)
                trained += [False] + [True] * c
                sequence += [-1] + [sequence_ids[u][k]] * c
                index = torch.cat([torch.arange(prompt_at, prompt_at + p - 1), torch.arange(start, start + 1 + c)])
                blocks.append((index, p - 1))

    def row(values: list[int] | list[bool], dtype: torch.dtype) -> Tensor:
        return torch.tensor([values], dtype=dtype)

    return Packed(
        input_ids=row(ids, torch.long),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        loss_mask=row(trained, torch.bool),
        position_ids=row(positions, torch.long),
        sequence=row(sequence, torch.long),
        spans=(tuple(blocks),),
        num_sequences=sum(len(c) for _, c in units),
    )


@dataclass(frozen=True)
class PairBatch:
    """B pairs: padded, 2B right-padded rows, rows ``0..B-1`` prompt+chosen and ``B..2B-1`` prompt+rejected;
    packed or shared_prefix, one row (see :func:`pack_units`) whose sequences ``0..B-1`` are the chosen
    completions and ``B..2B-1`` the rejected ones.

    ``input_ids``, ``attention_mask``, ``loss_mask``: (rows, T); ``index``: (B,) data set positions;
    ``position_ids``, ``sequence``, ``spans``: set by the packed layouts only; ``margin``: (B,) float, the
    rows' ``margin`` column (a pair without one gets 0), or None when no pair of the batch has one.
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    index: Tensor
    position_ids: Tensor | None = None
    sequence: Tensor | None = None
    spans: Spans | None = None
    margin: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_sequences(self) -> int:
        return 2 * self.num_pairs

    def completion_counts(self) -> Tensor:
        """(2B,) completion tokens: the chosen completions, then the rejected ones."""
        return sequence_counts(self.loss_mask, self.sequence, self.num_sequences)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_pairs(records: Sequence[PreferenceRecord], pad_id: int, layout: str = "padded") -> PairBatch:
    """Lay out pairs for one concatenated forward (chosen and rejected share the pass) in ``layout``.

    >>> r = PreferenceRecord(prompt_ids=(5, 6), chosen_ids=(7,), rejected_ids=(8, 9), index=3)
    >>> b = collate_pairs([r], pad_id=0)
    >>> b.input_ids
    tensor([[5, 6, 7, 0],
            [5, 6, 8, 9]])
    >>> b.attention_mask
    tensor([[1, 1, 1, 0],
            [1, 1, 1, 1]])
    >>> b.loss_mask
    tensor([[False, False,  True, False],
            [False, False,  True,  True]])
    >>> b.index, b.margin
    (tensor([3]), None)
    >>> collate_pairs([r, PreferenceRecord((5,), (7,), (8,), index=4, margin=1.5)], pad_id=0).margin
    tensor([0.0000, 1.5000])
    """
    index = torch.tensor([r.index for r in records], dtype=torch.long)
    margin = None
    if any(r.margin is not None for r in records):
        margin = torch.tensor([0.0 if r.margin is None else r.margin for r in records], dtype=torch.float32)
    if layout != "padded":
        units = [(r.prompt_ids, (r.chosen_ids, r.rejected_ids)) for r in records]
        p = pack_units(units, share_prefix=layout == "shared_prefix")
        return PairBatch(p.input_ids, p.attention_mask, p.loss_mask, index, p.position_ids, p.sequence, p.spans,
                         margin)  # fmt: skip
    rows = [(r.prompt_ids, r.chosen_ids) for r in records] + [(r.prompt_ids, r.rejected_ids) for r in records]
    input_ids, attention_mask, loss_mask = pad_completions(rows, pad_id)
    return PairBatch(input_ids, attention_mask, loss_mask, index, margin=margin)


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad (token ids, loss mask) rows: ``input_ids``, ``attention_mask``, ``loss_mask``, each (N, T).

    The one padding routine of every collator.

    >>> pad_rows([((5, 6, 7), (False, True, True)), ((8,), (False,))], pad_id=0)[0]
    tensor([[5, 6, 7],
            [8, 0, 0]])
    """
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(mask, dtype=torch.bool)
    return input_ids, attention_mask, loss_mask


def pad_completions(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad (prompt ids, completion ids) rows; the loss mask covers the completions."""
    return pad_rows([(tuple(p) + tuple(c), (False,) * len(p) + (True,) * len(c)) for p, c in rows], pad_id)
