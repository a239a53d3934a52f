"""Span attention in one kernel call per layer: the blocks of a packed row as a mask rule.

:mod:`posttrain.model.spans` describes a packed row by its blocks (``(index, keep)``: the row positions of
one causal sequence, and from which of them on the block writes its outputs). Calling attention once per
block is the fastest on a CPU, and ruinous on a GPU: a kernel per span, each of its own length (cuDNN builds
a plan per new shape). Here the same blocks become three integer ids per position, computed once per
micro-batch on the host from the block list:

* ``owner[t]``: the block that writes position ``t`` (-1 for a row's padding tail);
* ``unit[t]``: the unit of that block: blocks that read a shared prefix belong to the unit of the block that
  wrote the prefix (a pair's chosen and rejected completion after one prompt);
* ``shared[t]``: ``t`` is read by other blocks of its unit (the prompt, but its last token, in the
  shared-prefix layout).

and query ``q`` may read key ``k`` when ``k <= q`` and (``owner[k] == owner[q]``, or ``shared[k]`` and
``unit[k] == unit[q]``). Because a block's positions increase along the row, "``k <= q`` in the row" is
"``k`` before ``q`` in the block": a completion after a shared prompt attends with the lower-right causal
alignment (its queries are the suffix of its keys) without any offset arithmetic.

The rule is evaluated by two kernels, each one call per layer:

* CUDA: FlexAttention (``torch.nn.attention.flex_attention``, compiled once; torch marks the length
  dynamic after the first new shape, so lengths that vary from batch to batch do not recompile each
  time) with a ``BlockMask`` built once per micro-batch: tiles that no query may read are skipped, so the
  cost is the causal triangles of the sequences, not the square of the row.
* elsewhere (and on CUDA when FlexAttention is missing): ``scaled_dot_product_attention`` with the dense
  boolean mask of the same rule. It costs the square of the row; on a CPU the per-block loop is faster
  (``span_attention: auto`` keeps it there; benchmarks/README.md has the measurement), and it is the
  reference the FlexAttention path is tested against (FlexAttention has no backward on a CPU).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.packing import Block


@dataclass(frozen=True)
class SpanIds:
    """Per-position ids of a batch of packed rows, each (B, T) on the host: see the module docstring."""

    owner: Tensor
    unit: Tensor
    shared: Tensor

    def to(self, device: torch.device) -> SpanIds:
        return SpanIds(*(t.to(device, non_blocking=True) for t in (self.owner, self.unit, self.shared)))


def _positions(index: Tensor | tuple[int, int]) -> list[int]:
    if isinstance(index, tuple):
        return list(range(index[0], index[1]))
    return [int(i) for i in index.tolist()]  # a host tensor from the collator: no device read


def span_ids(spans: Sequence[Sequence[Block]], length: int) -> SpanIds:
    """The ids of ``spans`` (per row, its blocks in row order) for rows of ``length`` positions.

    >>> ids = span_ids([(((0, 3), 0), (torch.tensor([0, 3, 4, 5]), 1))], 6)  # [p p c | p' r r]
    >>> ids.owner.tolist(), ids.unit.tolist(), ids.shared.int().tolist()
    ([[0, 0, 0, 1, 1, 1]], [[0, 0, 0, 0, 0, 0]], [[1, 0, 0, 0, 0, 0]])
    """
    rows = len(spans)
    owner = [[-1] * length for _ in range(rows)]
    unit = [[-1] * length for _ in range(rows)]
    shared = [[False] * length for _ in range(rows)]
    for b, blocks in enumerate(spans):
        read_by_unit: dict[int, list[int]] = {}  # the prefix each unit's later blocks read
        for j, (index, keep) in enumerate(blocks):
            positions = _positions(index)
            if any(x >= y for x, y in itertools.pairwise(positions)):
                raise ValueError(f"span block {j} of row {b}: positions must increase along the row")
            borrowed, owned = positions[:keep], positions[keep:]
            home = j if not borrowed else unit[b][borrowed[0]]
            if borrowed:
                if any(owner[b][p] < 0 or unit[b][p] != home for p in borrowed):
                    raise ValueError(f"span block {j} of row {b} reads positions no earlier block of its unit wrote")
                if read_by_unit.setdefault(home, borrowed) != borrowed:
                    raise ValueError(f"span block {j} of row {b} reads another prefix than its unit's other blocks")
                for p in borrowed:
                    shared[b][p] = True
            for p in owned:
                owner[b][p], unit[b][p] = j, home
    return SpanIds(
        torch.tensor(owner, dtype=torch.long),
        torch.tensor(unit, dtype=torch.long),
        torch.tensor(shared, dtype=torch.bool),
    )


def allowed(ids: SpanIds, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """May query ``q`` of row ``b`` read key ``k``: THE rule, for the dense mask and FlexAttention's
    ``mask_mod`` alike (broadcasting index tensors in, a bool tensor out)."""
    same_block = ids.owner[b, k] == ids.owner[b, q]
    shared_prefix = ids.shared[b, k] & (ids.unit[b, k] == ids.unit[b, q])
    return (k <= q) & (same_block | shared_prefix)


def dense_mask(ids: SpanIds) -> Tensor:
    """(B, 1, T, T) bool: the rule for every (query, key) pair of each row."""
    rows, length = ids.owner.shape
    device = ids.owner.device
    b = torch.arange(rows, device=device)[:, None, None]
    q = torch.arange(length, device=device)[None, :, None]
    k = torch.arange(length, device=device)[None, None, :]
    return allowed(ids, b, q, k)[:, None]


_compiled_flex: Callable[..., Any] | None = None


def _flex() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """(compiled flex_attention, create_block_mask), or None where this torch lacks FlexAttention."""
    global _compiled_flex
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # torch < 2.5
        return None
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex, create_block_mask


@dataclass
class SpanBatch:
    """What travels to every attention layer of one forward: the blocks and the kernel choice, with the
    ids and masks built by the first layer that needs them and reused by the others (and by the recompute
    of a checkpointed layer in backward)."""

    blocks: Sequence[Sequence[Block]]
    kernel: str = "auto"
    """``auto``: ``mask`` on CUDA, ``loop`` elsewhere; ``loop``: one call per block; ``mask``: one per layer."""
    _cache: dict[Any, Any] = field(default_factory=dict)

    def kernel_for(self, device: torch.device) -> str:
        if self.kernel == "auto":
            return "mask" if device.type == "cuda" else "loop"
        return self.kernel

    def ids(self, length: int, device: torch.device) -> SpanIds:
        key = ("ids", length, device)
        if key not in self._cache:
            self._cache[key] = span_ids(self.blocks, length).to(device)
        return self._cache[key]

    def attend(self, query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling: float | None) -> Tensor:
        """One attention call over the whole batch of packed rows: (B, H, T, d) -> (B, H, T, d)."""
        rows, heads, length, _ = query.shape
        gqa = heads != key.shape[1]
        ids = self.ids(length, query.device)
        flex = _flex() if query.device.type == "cuda" else None
        if flex is not None:
            if dropout:
                raise RuntimeError("span attention's FlexAttention kernel has no attention dropout; "
                                   "use span_attention: loop")  # fmt: skip
            compiled, create_block_mask = flex
            if "block" not in self._cache:

                def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                    return allowed(ids, b, q, k)

                self._cache["block"] = create_block_mask(mask_mod, rows, None, length, length, device=query.device)
            out = compiled(query, key, value, block_mask=self._cache["block"], scale=scaling, enable_gqa=gqa)
            return out
        if "dense" not in self._cache:
            self._cache["dense"] = dense_mask(ids)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=self._cache["dense"], dropout_p=dropout, scale=scaling, enable_gqa=gqa
        )


__all__ = ["SpanBatch", "SpanIds", "allowed", "dense_mask", "span_ids"]
