"""The one reduction: unreduced losses -> a scalar, divided by a GLOBAL count.

Every loss in :mod:`posttrain.losses` returns its loss unreduced (per example ``(B,)`` or per token
``(B, T)``). The training loops never call ``.mean()`` on a micro-batch: they call :func:`aggregate` with
the number of examples (or tokens) in the whole optimizer step, summed over micro-batches and processes.
Summing those per-micro-batch results then gives exactly the loss of one big batch, so gradient
accumulation and data-parallel sharding do not change the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossOutput:
    """What every loss function returns.

    ``loss`` is unreduced: ``(B,)`` for sequence-level losses, ``(B, T)`` for token-level ones.
    ``metrics`` maps a name to a detached per-example tensor ``(B,)``; the loop reduces metrics with the
    same global counts as the loss.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def aggregate(loss: Tensor, *, global_count: float | int | Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum ``loss`` (weighted by ``mask`` when given) and divide by ``global_count``.

    ``global_count`` is the number of units (examples, or unmasked tokens) in the whole optimizer step
    across all micro-batches and processes, not in this micro-batch.

    >>> aggregate(torch.tensor([1.0, 3.0]), global_count=4)
    tensor(1.)
    >>> aggregate(torch.tensor([[1.0, 5.0], [2.0, 2.0]]), global_count=3,
    ...           mask=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    tensor(1.6667)
    """
    if isinstance(global_count, Tensor):
        count = global_count.to(loss.dtype)
    else:
        if global_count <= 0:
            raise ValueError(f"global_count must be positive, got {global_count}")
        # (torch.full: a fill on the device; torch.tensor(..., device=) would copy from the host and wait on it)
        count = torch.full((), float(global_count), dtype=loss.dtype, device=loss.device)
    total = (loss * mask.to(loss.dtype)).sum() if mask is not None else loss.sum()
    return total / count
