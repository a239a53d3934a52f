"""Span attention: several sequences in one row, each attending only inside itself, with no padding.

Packed and prefix-shared layouts (``layout: packed | shared_prefix``, see :mod:`posttrain.data.collate`)
put every sequence of a micro-batch one after another in a single row. Each row comes with its
**spans**: a list of ``(index, keep)`` blocks. ``index`` (a LongTensor, or a ``(start, end)`` range) lists
the row positions that form one causal sequence; attention runs causally over exactly those positions, and
the outputs of the block's positions from ``keep`` on are written back to them. A plain packed sequence is
one block ``((start, end), 0)``. A prompt shared by a chosen and a rejected completion laid out as
``[prompt | chosen | last prompt token | rejected]`` is two blocks: ``prompt + chosen`` (keep 0) and
``prompt[:-1] + last prompt token + rejected`` (keep ``len(prompt) - 1``): the rejected tokens see the
prompt's keys and values, never the chosen ones, and the prompt's MLPs and projections run once. The copy of
the last prompt token lets the shift convention of the log-prob primitive hold (each completion token is
scored from the hidden state just before it) and has the same context, so the same hidden state, as the
original.

Blocks are visited in row order and their kept outputs must tile the row's start without gaps, so the
output is a concatenation (no in-place writes: autograd stays simple). Each block is one causal
``scaled_dot_product_attention`` call, so attention costs the causal triangle of each sequence, nothing for
padding and nothing across sequences, instead of a (T x T) mask over the whole row.

The seam into transformers is its attention registry: :func:`span_attention` switches a model's attention
implementation to ``posttrain_spans`` for one forward, and the spans travel as the ``posttrain_spans``
keyword argument, which transformers' decoders pass through to every attention layer. A layer that
recomputes its forward during backward (gradient checkpointing) must find the switch on then too: the
loops run each backward of a span layout inside :func:`span_attention` as well (re-entrant).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posttrain.host import to_device
from posttrain.model.lora import base_model
from posttrain.model.span_mask import SpanBatch
from posttrain.packing import Spans

SPAN_ATTENTION = "posttrain_spans"
SPAN_LAYOUTS = ("packed", "shared_prefix")
"""The layouts scored through span attention (``padded`` uses the model's own attention and masks)."""
SPAN_KERNELS = ("auto", "loop", "mask")
"""How span attention runs (config key ``span_attention``): ``loop``, one causal call per block (the fastest on
a CPU); ``mask``, one call per layer with the blocks as a mask (FlexAttention on CUDA, see span_mask.py);
``auto``, ``mask`` on CUDA and ``loop`` elsewhere."""

_BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
"""Implementations whose attention is plain softmax(QK^T * scaling) V, what span attention computes."""


def _take(x: Tensor, index: Tensor | tuple[int, int]) -> Tensor:
    """Positions ``index`` of the sequence dimension of a (1, heads, T, d) tensor."""
    if isinstance(index, tuple):
        return x[:, :, index[0] : index[1]]
    return x.index_select(2, to_device(index, x.device))


@torch.compiler.disable  # the spans are Python structures: kept out of any compiled graph (compiled.py)
def span_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: (B, H, T, d) inputs -> ((B, T, H, d), None)."""
    spans: SpanBatch | Spans | None = kwargs.get("posttrain_spans")
    if spans is None:
        raise RuntimeError("posttrain_spans attention was called without spans (use posttrain.model.spans)")
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise RuntimeError("span attention does not implement attention-logit soft-capping or attention sinks")
    spans = spans if isinstance(spans, SpanBatch) else SpanBatch(spans)
    if spans.kernel_for(query.device) == "mask":  # one call for the whole batch (span_mask.py)
        return spans.attend(query, key, value, dropout, scaling).transpose(1, 2).contiguous(), None
    blocks = spans.blocks
    window = kwargs.get("sliding_window")
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    rows = []
    for b in range(batch):
        q_b, k_b, v_b = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        pieces = []
        for index, keep in blocks[b]:
            q, k, v = _take(q_b, index), _take(k_b, index), _take(v_b, index)
            if window is not None and q.shape[2] > window:
                raise RuntimeError(f"a packed sequence of {q.shape[2]} tokens exceeds the sliding window {window}")
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
            pieces.append(out[:, :, keep:])
        used = sum(piece.shape[2] for piece in pieces)
        if used < length:  # the row's padding tail (rows of unequal length): zeros, never read
            pieces.append(query.new_zeros((1, heads, length - used, dim)))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SPAN_ATTENTION, span_attention_forward)


def attention_implementation(model: nn.Module) -> str | None:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def span_obstacle(model: nn.Module, longest: int) -> str | None:
    """Why span attention cannot score this model exactly, or None when it can.

    ``longest``: the longest sequence a block can hold (a sliding window shorter than it would be ignored).
    """
    model = base_model(model)  # a PEFT wrapper: judge the model it wraps
    config = getattr(model, "config", None)
    impl = attention_implementation(model)
    if not getattr(type(model), "_supports_attention_backend", False):
        # Bloom, GPT-Neo, Falcon ... compute attention themselves and would drop the spans unread.
        return f"{type(model).__name__} does not dispatch its attention through transformers' attention registry"
    if impl not in _BASES:
        return f"the model's attention implementation {impl!r} is not one of {', '.join(_BASES)}"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps its attention logits (Gemma-2 style), which span attention does not"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and window < longest:
        return f"the model's sliding window ({window}) is shorter than a sequence can be ({longest})"
    return None


def resolve_layout(requested: str, best: str, model: nn.Module, longest: int) -> str:
    """The layout a run uses: ``auto`` is ``best`` where span attention is exact (or ``best`` is padded),
    else ``padded``. An explicit span layout that the model cannot take raises ``ValueError`` naming why.
    """
    if requested == "auto":
        requested = best
        if best == "padded" or span_obstacle(model, longest):
            return "padded"
    if requested == "padded":
        return requested
    obstacle = span_obstacle(model, longest)
    if obstacle:
        raise ValueError(f"layout: {requested} is not possible here: {obstacle}; use layout: padded (or auto)")
    return requested


@contextlib.contextmanager
def span_attention(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Score ``model`` with span attention inside the block (its own implementation is restored after);
    ``on=False``: leave it as it is (a padded layout)."""
    if not on:
        yield
        return
    config: Any = model.config
    before = config._attn_implementation
    _register()
    config._attn_implementation = SPAN_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


__all__ = [
    "SPAN_ATTENTION",
    "SPAN_KERNELS",
    "SPAN_LAYOUTS",
    "SpanBatch",
    "Spans",
    "resolve_layout",
    "span_attention",
    "span_attention_forward",
    "span_obstacle",
]
