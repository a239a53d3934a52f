"""The log-prob primitive against the naive computation, in float64, on the three tiny architectures.

Naive: ``log_softmax(model(input_ids, attention_mask).logits[:, :-1] / temperature)`` gathered at
``input_ids[:, 1:]``, stored at position ``t`` for the token ``t`` it scores, zero where ``loss_mask`` is False.
``model(...).logits`` applies the model's own logit transform (Gemma-2's soft-capping), so a primitive that
forgot it would fail here. The models use ``initializer_range=0.5``: logits spread over several units (Gemma-2's
raw logits reach ~17, past its cap of 5), so log-probs vary by ~3 nats between positions and a wrong shift,
row or transform shows up far above the float64 tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain.data.collate import PairBatch, collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.fixtures import ARCHS, build_model
from posttrain.model.logps import PairLogps, TokenLogps, completion_logps

F64 = torch.float64
# (prompt, chosen, rejected) lengths: rows of 7, 6, 7 (chosen) and 5, 10, 2 (rejected) tokens, right-padded
# to 10; 17 completion positions; the last rejected completion is empty (a row with nothing to score).
LENGTHS = [(3, 4, 2), (5, 1, 5), (2, 5, 0)]
N_COMPLETION = sum(c + r for _, c, r in LENGTHS)
TEMPERATURES = [1.0, 0.7]
# One position per chunk, several chunks with a ragged last one (17 = 5 x 3 + 2), one chunk holding all.
CHUNK_SIZES = [1, 3, 64]


def make_records(vocab_size: int, lengths: list[tuple[int, int, int]], seed: int = 0) -> list[PreferenceRecord]:
    """Records of pseudo-random non-special token ids (ids 0..5 are the special tokens)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(6, vocab_size, (n,), generator=g).tolist())

    return [PreferenceRecord(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(lengths)]


@dataclass(frozen=True)
class Naive:
    logps: Tensor  # (B, T)
    entropy: Tensor  # (B, T)


def naive(model: nn.Module, batch: PairBatch, temperature: float = 1.0) -> Naive:
    """The full-vocabulary computation over every position, masked afterwards."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / temperature
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
    token = logprobs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T-1)
    select = batch.loss_mask[:, 1:]
    first = token.new_zeros((token.shape[0], 1))
    return Naive(
        logps=torch.cat([first, torch.where(select, token, 0.0)], dim=1),
        entropy=torch.cat([first, torch.where(select, entropy, 0.0)], dim=1),
    )


def primitive(model: nn.Module, batch: PairBatch, **kwargs: float | int | bool) -> TokenLogps:
    return completion_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, **kwargs)  # type: ignore[arg-type]


def exact(actual: Tensor, expected: Tensor) -> None:
    """Float64 agreement: both sides do the same arithmetic in a different order (~1e-14 observed)."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module", params=ARCHS)
def model64(request: pytest.FixtureRequest, tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A tiny float64 model per architecture; shared, so tests use ``torch.autograd.grad``, never ``.grad``."""
    return build_model(tiny_tokenizer, arch=request.param, initializer_range=0.5).double().eval()


@pytest.fixture(scope="module")
def batch(tiny_tokenizer: PreTrainedTokenizerFast) -> PairBatch:
    return collate_pairs(make_records(len(tiny_tokenizer), LENGTHS), tiny_tokenizer.pad_token_id)


def test_batch_is_what_the_tests_claim(batch: PairBatch) -> None:
    """Guards the fixture: rows of different lengths, right padding, 17 completion positions, an empty row."""
    lengths = batch.attention_mask.sum(-1).tolist()
    assert lengths == [7, 6, 7, 5, 10, 2]
    assert int(batch.loss_mask.sum()) == N_COMPLETION == 17
    assert batch.loss_mask.sum(-1).tolist() == [4, 1, 5, 2, 5, 0]
    assert not batch.loss_mask[batch.attention_mask == 0].any()


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_values_and_gradients_match_naive(
    model64: PreTrainedModel, batch: PairBatch, chunk_size: int, temperature: float
) -> None:
    names, params = zip(*((n, p) for n, p in model64.named_parameters() if p.requires_grad), strict=True)
    weights = torch.randn(batch.input_ids.shape, dtype=F64, generator=torch.Generator().manual_seed(1))

    expected = naive(model64, batch, temperature)
    out = primitive(model64, batch, chunk_size=chunk_size, temperature=temperature)
    assert out.logps.dtype == F64 and out.logps.shape == batch.input_ids.shape
    assert torch.equal(out.mask, batch.loss_mask)
    assert out.entropy is None
    exact(out.logps, expected.logps)

    grads = torch.autograd.grad((out.logps * weights).sum(), params)
    expected_grads = torch.autograd.grad((expected.logps * weights).sum(), params)
    for name, g, e in zip(names, grads, expected_grads, strict=True):
        assert e.abs().max() > 0, f"{name} should receive gradient from the completion tokens"
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-10), f"{name}: max |diff| {(g - e).abs().max():.3g}"

    with torch.no_grad():  # the no-grad path runs the chunks without checkpointing
        exact(primitive(model64, batch, chunk_size=chunk_size, temperature=temperature).logps, expected.logps)


@pytest.mark.parametrize(("chunk_size", "temperature"), [(1, 0.7), (3, 1.0), (64, 0.7)])
def test_entropy_matches_naive(model64: PreTrainedModel, batch: PairBatch, chunk_size: int, temperature: float) -> None:
    """Entropy of the tempered next-token distribution at completion positions, and its gradient."""
    params = [p for p in model64.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    w_logps = torch.randn(batch.input_ids.shape, dtype=F64, generator=g)
    w_entropy = torch.randn(batch.input_ids.shape, dtype=F64, generator=g)

    expected = naive(model64, batch, temperature)
    out = primitive(model64, batch, chunk_size=chunk_size, temperature=temperature, with_entropy=True)
    assert out.entropy is not None
    exact(out.logps, expected.logps)
    exact(out.entropy, expected.entropy)
    # Entropy is between 0 and log V, and not the uniform maximum: the test model is far from uniform.
    completion = out.entropy[batch.loss_mask]
    assert (completion > 0).all() and (completion < math.log(model64.config.vocab_size) - 0.1).all()

    grads = torch.autograd.grad((out.logps * w_logps + out.entropy * w_entropy).sum(), params)
    expected_grads = torch.autograd.grad((expected.logps * w_logps + expected.entropy * w_entropy).sum(), params)
    for g_, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g_, e, rtol=1e-9, atol=1e-10)


def test_sums_counts_and_pair_split(model64: PreTrainedModel, batch: PairBatch) -> None:
    out = primitive(model64, batch, chunk_size=3)
    expected = naive(model64, batch)
    exact(out.sums, expected.logps.sum(-1))
    assert out.counts.tolist() == [4, 1, 5, 2, 5, 0]
    assert out.sums[5].item() == 0.0  # the empty rejected completion

    pair = PairLogps.from_tokens(out)
    exact(pair.chosen_logps, expected.logps[:3].sum(-1))
    exact(pair.rejected_logps, expected.logps[3:].sum(-1))
    assert pair.chosen_lengths.tolist() == [c for _, c, _ in LENGTHS]
    assert pair.rejected_lengths.tolist() == [r for _, _, r in LENGTHS]
    assert pair.chosen_logps.requires_grad
    detached = pair.detach()
    assert not detached.chosen_logps.requires_grad and not detached.rejected_logps.requires_grad
    assert torch.equal(detached.chosen_logps, pair.chosen_logps.detach())


def test_padded_rows_equal_unpadded_rows(model64: PreTrainedModel, batch: PairBatch) -> None:
    """Each row scored alone, without padding, equals its row in the right-padded concatenated batch."""
    with torch.no_grad():
        together = primitive(model64, batch, chunk_size=3).logps
        for row in range(batch.input_ids.shape[0]):
            n = int(batch.attention_mask[row].sum())
            alone = completion_logps(
                model64,
                batch.input_ids[row : row + 1, :n],
                batch.attention_mask[row : row + 1, :n],
                batch.loss_mask[row : row + 1, :n],
                chunk_size=3,
            ).logps
            if model64.config.model_type == "gemma2":
                # Gemma-2's RMSNorm computes in float32 whatever the model's dtype, so the last-bit float64
                # differences between a batch of 6 and a batch of 1 (BLAS blocking) come out rounded to
                # float32: agreement to float32 precision (rel 1.5e-8 seen) is all this comparison can show.
                torch.testing.assert_close(together[row : row + 1, :n], alone, rtol=1e-6, atol=1e-6)
            else:
                exact(together[row : row + 1, :n], alone)
            assert not together[row, n:].any()


def test_gemma2_soft_capping_is_applied(tiny_tokenizer: PreTrainedTokenizerFast, batch: PairBatch) -> None:
    """Guards the comparison above: on this fixture, leaving the cap out changes log-probs by nats."""
    model = build_model(tiny_tokenizer, arch="gemma2", initializer_range=0.5).double()
    cap = model.config.final_logit_softcapping
    assert cap
    with torch.no_grad():
        out = primitive(model, batch).logps
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        raw = model.get_output_embeddings()(hidden)[:, :-1]
        assert raw.abs().max() > 2 * cap  # the cap binds
        uncapped = torch.log_softmax(raw, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        uncapped = torch.where(batch.loss_mask[:, 1:], uncapped, 0.0)
        capped = torch.log_softmax(torch.tanh(raw / cap) * cap, -1).gather(-1, batch.input_ids[:, 1:, None])
        capped = torch.where(batch.loss_mask[:, 1:], capped.squeeze(-1), 0.0)
    assert (out[:, 1:] - uncapped).abs().max() > 1.0
    exact(out[:, 1:], capped)


def test_rows_without_completion_tokens(model64: PreTrainedModel, batch: PairBatch) -> None:
    """A row with an all-False mask, and a batch with no completion token at all: zeros, count 0."""
    empty = torch.zeros_like(batch.loss_mask)
    out = completion_logps(model64, batch.input_ids, batch.attention_mask, empty, chunk_size=3, with_entropy=True)
    assert out.logps.shape == batch.input_ids.shape and out.logps.dtype == F64
    assert not out.logps.any() and out.entropy is not None and not out.entropy.any()
    assert out.sums.tolist() == [0.0] * 6 and out.counts.tolist() == [0] * 6


def test_first_token_cannot_be_scored(model64: PreTrainedModel, batch: PairBatch) -> None:
    loss_mask = batch.loss_mask.clone()
    loss_mask[1, 0] = True
    with pytest.raises(ValueError, match=r"loss_mask\[:, 0\]"):
        completion_logps(model64, batch.input_ids, batch.attention_mask, loss_mask)


# ------------------------------------------------------------------------------------------------------
# Memory shape: the LM head only ever sees chunks of gathered completion positions


@pytest.fixture
def head_inputs(model64: PreTrainedModel) -> Iterator[list[torch.Size]]:
    """The input shape of every call of the LM head while the fixture is active."""
    shapes: list[torch.Size] = []
    handle = model64.get_output_embeddings().register_forward_hook(lambda _m, args, _out: shapes.append(args[0].shape))
    yield shapes
    handle.remove()


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_head_sees_chunks_only(
    model64: PreTrainedModel, batch: PairBatch, head_inputs: list[torch.Size], chunk_size: int
) -> None:
    hidden_size = model64.config.hidden_size
    calls = math.ceil(N_COMPLETION / chunk_size)
    with torch.no_grad():
        primitive(model64, batch, chunk_size=chunk_size)
    assert len(head_inputs) == calls
    assert all(len(s) == 2 and s[0] <= chunk_size and s[1] == hidden_size for s in head_inputs), head_inputs
    assert sum(s[0] for s in head_inputs) == N_COMPLETION  # completion positions only: no prompt, no padding

    head_inputs.clear()
    vocab = model64.config.vocab_size
    saved: list[torch.Size] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = primitive(model64, batch, chunk_size=chunk_size, with_entropy=True)
    forward = list(head_inputs)
    assert len(forward) == calls and all(len(s) == 2 and s[0] <= chunk_size for s in forward)
    # Nothing of vocabulary width (logits, log-probs) is kept for backward outside the checkpointed chunks.
    assert saved and not any(vocab in s for s in saved), [s for s in saved if vocab in s]

    assert out.entropy is not None
    (out.logps.sum() + out.entropy.sum()).backward(inputs=[model64.get_output_embeddings().weight])
    # Backward recomputed every chunk (same shapes again): checkpointing kept no chunk's logits.
    assert head_inputs[len(forward) :] and sorted(head_inputs[len(forward) :]) == sorted(forward)
    assert len(head_inputs) == 2 * calls
    model64.get_output_embeddings().weight.grad = None


def test_bf16_autocast_close_to_fp32(tiny_tokenizer: PreTrainedTokenizerFast, batch: PairBatch) -> None:
    """Under bf16 autocast the head runs in bf16 and log-probs come back float32, near the fp32 ones.

    Gemma-2 caps logits at 5, which bounds the bf16 rounding error (8-bit mantissa: 2^-9 relative, so
    ~0.01 per logit): ~0.025 nats observed, against log-probs spread over ~3 nats (std). The tolerance
    0.1 is 30 times smaller than that spread, so a wrong token, row or transform still fails.
    """
    model = build_model(tiny_tokenizer, arch="gemma2", initializer_range=0.5).eval()
    with torch.no_grad():
        fp32 = primitive(model, batch, chunk_size=5).logps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = primitive(model, batch, chunk_size=5).logps
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.float32
    assert fp32[batch.loss_mask].std() > 2.5
    assert not torch.equal(bf16, fp32)  # autocast did take effect
    torch.testing.assert_close(bf16, fp32, rtol=0.0, atol=0.1)
