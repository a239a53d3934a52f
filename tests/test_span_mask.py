"""Span attention in one call per layer (posttrain/model/span_mask.py): the rule, its kernels, the call count.

Equality with padded rows (log-probs and gradients, both kernels) is in tests/test_layout.py; here: the
rule's ids by hand, the lower-right alignment of a completion after a shared prompt, FlexAttention's forward
(it has no backward on a CPU) against the dense mask, and the number of attention calls per forward, which
must not grow with the number of sequences in the row.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from posttrain.data.collate import collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.fixtures import build_model
from posttrain.model import span_mask, spans
from posttrain.model.logps import completion_logps
from posttrain.model.span_mask import SpanBatch, allowed, dense_mask, span_ids


def pairs(n: int, vocab_size: int) -> list[PreferenceRecord]:
    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 9, (3,), generator=g))
        ids = [tuple(torch.randint(6, vocab_size, (k,), generator=g).tolist()) for k in (p, c, r)]
        out.append(PreferenceRecord(*ids, index=i))
    return out


def test_shared_prefix_rule_by_hand() -> None:
    """Row ``[p0 p1 p2 c0 c1 | p2' r0 r1]`` (prompt of 3, chosen of 2, the prompt's last token again, rejected
    of 2): the blocks are ``0..4`` (keep 0) and ``{0, 1, 5, 6, 7}`` (keep 2). Query r0 (position 6) reads
    p0, p1 (the shared prompt but its last token), p2' and itself; never p2, c0 or c1. Query c1 (position
    4) reads 0..4. The prompt's first two tokens are read by the rejected block: ``shared``."""
    blocks = [(((0, 5), 0), (torch.tensor([0, 1, 5, 6, 7]), 2))]
    ids = span_ids(blocks, 8)
    assert ids.owner.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert ids.shared.tolist() == [[True, True, False, False, False, False, False, False]]
    mask = dense_mask(ids)[0, 0]
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 5, 6]
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert mask[1].nonzero().flatten().tolist() == [0, 1]
    # The lower-right alignment: r1 (the rejected block's 5th position) reads the block's first 5 keys.
    assert mask[7].nonzero().flatten().tolist() == [0, 1, 5, 6, 7]


def test_padding_tail_and_packed_rows() -> None:
    """Two rows of unequal fill (SFT packing): each record its own block; the tail reads only the tail."""
    blocks = [(((0, 2), 0), ((2, 5), 0)), (((0, 3), 0),)]
    mask = dense_mask(span_ids(blocks, 5))[:, 0]
    assert mask[0, 3].nonzero().flatten().tolist() == [2, 3]
    assert mask[1, 4].nonzero().flatten().tolist() == [3, 4]  # padding: never read, but never NaN
    assert mask.diagonal(dim1=1, dim2=2).all()  # every query reads at least itself


def test_blocks_that_cannot_be_a_mask_are_refused() -> None:
    with pytest.raises(ValueError, match="positions must increase"):
        span_ids([((torch.tensor([2, 1]), 0),)], 3)
    with pytest.raises(ValueError, match="no earlier block of its unit wrote"):
        span_ids([((torch.tensor([0, 1]), 1),)], 2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_forward_equals_the_dense_mask() -> None:
    """FlexAttention's ``mask_mod`` is :func:`allowed` itself; on a CPU its eager forward (no backward there)
    must equal SDPA with the dense mask, grouped-query attention included."""
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    records = pairs(5, 64)
    batch = collate_pairs(records, 0, "shared_prefix")
    length = batch.input_ids.shape[1]
    ids = span_ids(batch.spans, length)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return allowed(ids, b, q, k)

    block = flex_attention.create_block_mask(mask_mod, 1, None, length, length, device="cpu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 8, generator=g)
    k, v = torch.randn(1, 2, length, 8, generator=g), torch.randn(1, 2, length, 8, generator=g)
    with torch.no_grad():
        flex = flex_attention.flex_attention(q, k, v, block_mask=block, scale=0.3, enable_gqa=True)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(ids), scale=0.3, enable_gqa=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_pairs", [2, 16])
def test_mask_kernel_calls_attention_once_per_layer(tiny_tokenizer: PreTrainedTokenizerFast, n_pairs: int) -> None:
    """``span_attention: mask``: one attention call per layer per forward, for 2 pairs as for 16; the mask is
    built once per forward, not per layer. (``loop`` makes one call per block: 2 per pair per layer.)"""
    model = build_model(tiny_tokenizer, arch="llama").eval()
    layers = model.config.num_hidden_layers
    batch = collate_pairs(pairs(n_pairs, model.config.vocab_size), 0, "shared_prefix")
    sdpa = F.scaled_dot_product_attention
    for kernel, per_layer in (("mask", 1), ("loop", 2 * n_pairs)):
        with (
            mock.patch.object(span_mask.F, "scaled_dot_product_attention", side_effect=sdpa) as in_mask,
            mock.patch.object(spans.F, "scaled_dot_product_attention", side_effect=sdpa) as in_loop,
            mock.patch.object(span_mask, "dense_mask", side_effect=span_mask.dense_mask) as built,
            torch.no_grad(),
        ):
            completion_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                             position_ids=batch.position_ids, spans=batch.spans, span_kernel=kernel)  # fmt: skip
        assert in_mask.call_count + in_loop.call_count == layers * per_layer, kernel
        assert built.call_count == (1 if kernel == "mask" else 0)


def test_auto_kernel_is_per_device() -> None:
    batch = SpanBatch([], "auto")
    assert batch.kernel_for(torch.device("cpu")) == "loop"
    assert batch.kernel_for(torch.device("cuda", 0)) == "mask"
    assert SpanBatch([], "mask").kernel_for(torch.device("cpu")) == "mask"
