"""Reference strategies: the cache key, the disk cache, the cached and frozen references.

The cache must recompute whenever the numbers could differ (weights, token ids, precision) and never
otherwise, must never leave a half-written file under its final name, and must hand back exactly what the
reference model computed for each pair, looked up by the pair's data set index.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain.data.collate import PairBatch, collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.fixtures import build_model
from posttrain.model.logps import PairLogps, completion_logps
from posttrain.training import checkpoint, reference
from posttrain.training.reference import (
    CACHE_FORMAT,
    CachedReference,
    FrozenReference,
    NoReference,
    cached_tensors,
    compute_pair_logps,
    fingerprint,
    read_pairs,
    weights_digest,
)

# (prompt, chosen, rejected) lengths of six pairs: rows from 3 to 13 tokens, so every batch is padded.
LENGTHS = [(3, 4, 2), (5, 1, 5), (2, 6, 3), (6, 7, 1), (1, 2, 8), (4, 3, 3)]


def make_records(vocab_size: int, lengths: list[tuple[int, int, int]], seed: int = 0) -> list[PreferenceRecord]:
    """Records of pseudo-random non-special token ids (ids 0..5 are the special tokens)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(6, vocab_size, (n,), generator=g).tolist())

    return [PreferenceRecord(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(lengths)]


def score(model: nn.Module, batch: PairBatch) -> PairLogps:
    tokens = completion_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_size=4)
    return PairLogps.from_tokens(tokens)


@pytest.fixture(scope="module")
def model(tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """fp32, parameters requiring grad (as a policy's do). Shared: tests that change weights copy it."""
    return build_model(tiny_tokenizer, arch="llama", initializer_range=0.5).eval()


@pytest.fixture(scope="module")
def records(tiny_tokenizer: PreTrainedTokenizerFast) -> list[PreferenceRecord]:
    return make_records(len(tiny_tokenizer), LENGTHS)


@pytest.fixture(scope="module")
def pad_id(tiny_tokenizer: PreTrainedTokenizerFast) -> int:
    return int(tiny_tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------------------
# The cache key


def test_weights_digest_is_stable_and_sees_one_element(model: PreTrainedModel) -> None:
    digest = weights_digest(model)
    assert isinstance(digest, str) and len(digest) == 32
    assert weights_digest(model) == digest
    assert weights_digest(copy.deepcopy(model)) == digest

    changed = copy.deepcopy(model)
    weight = changed.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():  # the smallest possible change: one element to its next float
        weight[3, 7] = torch.nextafter(weight[3, 7], torch.tensor(float("inf")))
    assert weights_digest(changed) != digest
    with torch.no_grad():
        weight[3, 7] = model.model.layers[1].mlp.down_proj.weight[3, 7]
    assert weights_digest(changed) == digest

    assert weights_digest(copy.deepcopy(model).bfloat16()) != digest


def test_weights_digest_sees_names_shapes_and_scalars() -> None:
    """Same bytes under another name or shape is another model; 0-dim tensors (scales) are hashed too."""

    def module(**tensors: Tensor) -> nn.Module:
        m = nn.Module()
        for name, t in tensors.items():
            m.register_buffer(name, t)
        return m

    x = torch.arange(6.0)
    base = weights_digest(module(x=x.reshape(2, 3)))
    assert weights_digest(module(x=x.reshape(3, 2))) != base
    assert weights_digest(module(y=x.reshape(2, 3))) != base
    scalar = weights_digest(module(x=x.reshape(2, 3), s=torch.tensor(2.0)))
    assert scalar not in (base, weights_digest(module(x=x.reshape(2, 3), s=torch.tensor(3.0))))


def test_fingerprint_changes_with_anything_that_changes_the_numbers(records: list[PreferenceRecord]) -> None:
    key = fingerprint("w0", records, "fp32")
    assert key == fingerprint("w0", [dataclasses.replace(r) for r in records], "fp32")
    assert fingerprint("w1", records, "fp32") != key
    assert fingerprint("w0", records, "bf16") != key

    r = records[2]
    variants = [
        dataclasses.replace(r, prompt_ids=(*r.prompt_ids[:-1], r.prompt_ids[-1] + 1)),
        dataclasses.replace(r, chosen_ids=(*r.chosen_ids[:1], 7, *r.chosen_ids[2:])),
        dataclasses.replace(r, rejected_ids=r.rejected_ids[:-1]),
        # Same tokens, prompt/completion boundary moved one token: the loss mask (and the log-prob) differ.
        dataclasses.replace(r, prompt_ids=r.prompt_ids[:-1], chosen_ids=r.prompt_ids[-1:] + r.chosen_ids),
        # Chosen and rejected swapped.
        dataclasses.replace(r, chosen_ids=r.rejected_ids, rejected_ids=r.chosen_ids),
    ]
    keys = {fingerprint("w0", [*records[:2], v, *records[3:]], "fp32") for v in variants}
    assert len(keys) == len(variants) and key not in keys
    assert fingerprint("w0", records[::-1], "fp32") != key  # another order is another index -> logps map
    assert fingerprint("w0", records[:-1], "fp32") != key


# ------------------------------------------------------------------------------------------------------
# The disk cache


class Compute:
    """A compute function that counts its calls."""

    def __init__(self, seed: int = 0) -> None:
        self.calls = 0
        g = torch.Generator().manual_seed(seed)
        self.chosen, self.rejected = -10 * torch.rand(5, generator=g), -10 * torch.rand(5, generator=g)

    def __call__(self) -> dict[str, Tensor]:
        self.calls += 1
        return {"chosen": self.chosen.clone(), "rejected": self.rejected.clone()}


def test_cached_reference_computes_once_then_reuses(tmp_path: Path) -> None:
    cache_dir = tmp_path / "does" / "not" / "exist"
    messages: list[str] = []
    compute = Compute()

    first = cached_tensors(cache_dir, "k1", compute, log=messages.append)
    assert compute.calls == 1
    assert sorted(p.name for p in cache_dir.iterdir()) == ["k1.safetensors"]  # no *.tmp* left behind
    assert torch.equal(first["chosen"], compute.chosen) and torch.equal(first["rejected"], compute.rejected)
    with safe_open(str(cache_dir / "k1.safetensors"), "pt") as f:
        assert f.metadata() == {"format": CACHE_FORMAT}

    again = cached_tensors(cache_dir, "k1", compute, log=messages.append)
    assert compute.calls == 1, "the second call must load the file, not compute"
    assert torch.equal(again["chosen"], compute.chosen) and torch.equal(again["rejected"], compute.rejected)
    assert again["chosen"].dtype == torch.float32
    assert "computed" in messages[0] and "reused" in messages[1]

    other = Compute(seed=1)
    recomputed = cached_tensors(cache_dir, "k2", other, log=messages.append)
    assert other.calls == 1 and torch.equal(recomputed["chosen"], other.chosen)
    assert sorted(p.name for p in cache_dir.iterdir()) == ["k1.safetensors", "k2.safetensors"]
    assert compute.calls == 1


def test_failed_compute_or_write_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while computing or while writing never leaves a file under the final name, nor the half-written
    temporary file (a full disk would otherwise keep it filled)."""

    def crash() -> dict[str, Tensor]:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cached_tensors(tmp_path, "k", crash, log=lambda _: None)
    assert not (tmp_path / "k.safetensors").exists()

    def killed_mid_write(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(reference, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        cached_tensors(tmp_path, "k", Compute(), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    compute = Compute()
    cached_tensors(tmp_path, "k", compute, log=lambda _: None)
    assert compute.calls == 1 and (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("failures", [2, 3])
def test_a_full_disk_under_the_cache_is_retried_then_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failures: int
) -> None:
    """A failed cache write is tried again like a checkpoint's (a third try succeeds: the file is there);
    when every try fails, the computed tensors are returned with a one-line warning naming the file, and no
    half-written file is left: the cache only spares the next run the reference pass."""
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0))
    tries = []
    real_save = reference.save_file

    def full_disk(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
        tries.append(filename)
        if len(tries) <= failures:
            Path(filename).write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(reference, "save_file", full_disk)
    compute = Compute()
    got = cached_tensors(tmp_path, "k", compute, log=lambda _: None)
    assert compute.calls == 1 and torch.equal(got["chosen"], compute.chosen) and len(tries) == 3
    err = capsys.readouterr().err
    if failures == 2:
        assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]
        assert "not cached" not in err
    else:
        assert list(tmp_path.iterdir()) == []
        warning = [line for line in err.splitlines() if "not cached" in line]
        assert len(warning) == 1 and str(tmp_path / "k.safetensors") in warning[0]
        assert "No space left on device" in warning[0]


# ------------------------------------------------------------------------------------------------------
# The references


def test_compute_pair_logps_does_not_depend_on_batching(
    model: PreTrainedModel, records: list[PreferenceRecord], pad_id: int
) -> None:
    """Padding (batch of 4 + a batch of 2, vs. no padding at batch size 1) does not change the log-probs.

    The sums are -7 to -82 nats; the largest difference observed is 7.6e-6, one fp32 ulp at 82. The
    tolerance (1e-5 + 1e-6 relative: ~10 ulp) is far below the gap between any two pairs' values.
    """
    one = tuple(compute_pair_logps(score, model, records, pad_id, batch_size=1).values())  # (chosen, rejected)
    four = tuple(compute_pair_logps(score, model, records, pad_id, batch_size=4).values())
    for a, b in zip(one, four, strict=True):
        assert a.shape == (len(records),) and a.dtype == torch.float32 and not a.requires_grad
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)
    # Record order, against one scoring of the whole data set as a single batch.
    with torch.no_grad():
        full = score(model, collate_pairs(records, pad_id))
    torch.testing.assert_close(four[0], full.chosen_logps, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(four[1], full.rejected_logps, rtol=1e-6, atol=1e-5)
    assert (one[0] - one[1]).abs().min() > 1e-2  # chosen and rejected are not mixed up by a tolerance


def test_cached_reference_returns_the_computed_logps_by_index(
    tmp_path: Path, model: PreTrainedModel, records: list[PreferenceRecord], pad_id: int
) -> None:
    tables = compute_pair_logps(score, model, records, pad_id, batch_size=4)
    chosen, rejected = tables["chosen"], tables["rejected"]
    stored = CachedReference(cached_tensors(tmp_path, "key", lambda: tables, log=lambda _: None), read_pairs)

    def fail() -> dict[str, Tensor]:
        pytest.fail("must not recompute")

    loaded = CachedReference(cached_tensors(tmp_path, "key", fail, log=lambda _: None), read_pairs)
    picked = [records[4], records[1], records[3]]
    batch = collate_pairs(picked, pad_id)
    for ref in (stored, loaded):
        out = ref.logps(batch)
        assert torch.equal(out.chosen_logps, chosen[[4, 1, 3]])
        assert torch.equal(out.rejected_logps, rejected[[4, 1, 3]])
        assert out.chosen_lengths.tolist() == [len(r.chosen_ids) for r in picked]
        assert out.rejected_lengths.tolist() == [len(r.rejected_ids) for r in picked]
    assert isinstance(stored, CachedReference)


def test_frozen_reference_equals_scoring_and_carries_no_grad(
    model: PreTrainedModel, records: list[PreferenceRecord], pad_id: int
) -> None:
    assert all(p.requires_grad for p in model.parameters())
    batch = collate_pairs(records[:4], pad_id)
    expected = score(model, batch)
    assert expected.chosen_logps.requires_grad  # grad is on here, so "no grad" below is FrozenReference's doing
    out = FrozenReference(model, score).logps(batch)
    for name in ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"):
        got, want = getattr(out, name), getattr(expected, name)
        assert not got.requires_grad and got.grad_fn is None
        torch.testing.assert_close(got, want.detach(), rtol=0.0, atol=0.0)
    assert out.chosen_lengths.tolist() == [len(r.chosen_ids) for r in records[:4]]
    assert NoReference().logps(batch) is None


def test_weights_digest_covers_the_architecture_settings() -> None:
    """Same weights, different soft-cap: different log-probs, so a different cache key."""
    from posttrain.fixtures import build_model, build_tokenizer

    tok = build_tokenizer("chatml")
    a = build_model(tok, arch="gemma2")
    b = build_model(tok, arch="gemma2", final_logit_softcapping=None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert weights_digest(a) != weights_digest(b)
