"""Batch layouts keep the maths: padded, packed and shared-prefix batches give the same log-probs, losses and
gradients (the speed levers of benchmarks/ are only worth having if they change nothing else).

The models run in float64, but transformers' RMSNorm computes in float32 whatever the model's dtype, and
its backward rounds each incoming gradient to float32. Log-probs come out equal to 1e-10 (the same inputs
meet the same roundings); gradients of a prompt shared by two completions are summed BEFORE that rounding
instead of after it, so they differ by float32 noise (7.5e-7 of the largest entry seen, on prompt-token
embeddings; finite differences cannot tell the two apart). The gradient tolerance (1e-5 relative, 1e-5 of
the tensor's largest entry) is far below what a wrong mask does: attending across sequences, or from a
rejected token to the chosen one, changes log-probs by 1e-2 or more on these models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import BIT_EXACT, first_bundled_pairs, run_config
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

import posttrain
from posttrain.config import ConfigError, load
from posttrain.data.collate import LAYOUTS, PairBatch, collate_pairs, pad_completions
from posttrain.data.examples import PreferenceRecord, UnpairedRecord
from posttrain.data.unpaired import collate_unpaired
from posttrain.fixtures import build_model
from posttrain.losses.preference import dpo
from posttrain.model.logps import completion_logps
from posttrain.model.spans import resolve_layout, span_attention
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online
from posttrain.training.rollouts import Samples, Scorer

# (prompt, chosen, rejected) lengths: unequal everywhere, so padded rows are padded and packed ones are not.
LENGTHS = [(3, 4, 2), (5, 1, 5), (2, 6, 3), (6, 7, 1), (1, 2, 8)]


def make_pairs(vocab_size: int, seed: int = 0) -> list[PreferenceRecord]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(6, vocab_size, (n,), generator=g).tolist())

    return [PreferenceRecord(ids(p), ids(c), ids(r), index=i) for i, (p, c, r) in enumerate(LENGTHS)]


def score(model: nn.Module, batch: Any, kernel: str = "auto") -> Tensor:
    """Summed completion log-probs per sequence (chosen then rejected for pairs), as the tasks score."""
    tokens = completion_logps(
        model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_size=3,
        position_ids=batch.position_ids, spans=batch.spans, sequence=batch.sequence,
        num_sequences=batch.num_sequences, span_kernel=kernel,
    )  # fmt: skip
    return tokens.sums


@pytest.fixture(scope="module", params=["llama", "qwen2-gqa"])
def model(request: pytest.FixtureRequest, tiny_tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """float64 (layouts then differ by rounding only); Qwen2 with grouped-query attention (2 KV heads)."""
    if request.param == "llama":
        m = build_model(tiny_tokenizer, arch="llama", initializer_range=0.5)
    else:
        m = build_model(tiny_tokenizer, arch="qwen2", initializer_range=0.5, num_key_value_heads=2)
    return m.double().eval()


def grads_of(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel", ["loop", "mask"])
@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_pair_layouts_equal_padded(model: PreTrainedModel, layout: str, kernel: str) -> None:
    """Log-probs per completion, a DPO loss on them and its gradient: the same as padded rows, with span
    attention run block by block (``loop``) or in one call per layer (``mask``)."""
    records = make_pairs(model.config.vocab_size)
    padded, other = collate_pairs(records, 0, "padded"), collate_pairs(records, 0, layout)
    assert other.input_ids.shape[0] == 1 and other.attention_mask.all()  # one row, no padding
    if layout == "shared_prefix":  # each prompt once, plus one repeated token per pair
        assert other.input_ids.shape[1] == sum(p + c + r + 1 for p, c, r in LENGTHS)
    torch.testing.assert_close(other.completion_counts(), padded.completion_counts(), rtol=0, atol=0)

    def loss_of(batch: PairBatch) -> tuple[Tensor, Tensor]:
        sums = score(model, batch, kernel)
        n = batch.num_pairs
        loss = dpo(
            policy_chosen_logps=sums[:n], policy_rejected_logps=sums[n:],
            ref_chosen_logps=sums[:n].detach() * 0.9, ref_rejected_logps=sums[n:].detach() * 1.1, beta=0.5,
        ).loss  # fmt: skip
        return sums, loss.mean()

    sums_a, loss_a = loss_of(padded)
    sums_b, loss_b = loss_of(other)
    torch.testing.assert_close(sums_b, sums_a, rtol=1e-10, atol=1e-10)
    assert (sums_a[: len(records)] - sums_a[len(records) :]).abs().min() > 1e-2  # chosen, rejected not mixed up
    ga, gb = grads_of(model, loss_a), grads_of(model, loss_b)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        atol = 1e-5 * float(ga[name].abs().max())
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=atol, msg=name)
    assert model.config._attn_implementation == "sdpa"  # span attention was switched on for the forward only


def test_shared_prefix_keeps_rejected_from_seeing_chosen(model: PreTrainedModel) -> None:
    """A bite: the same row scored with one block per pair (rejected sees chosen) gives other log-probs."""
    records = make_pairs(model.config.vocab_size)
    shared = collate_pairs(records, 0, "shared_prefix")
    start, blocks = 0, []
    for p, c, r in LENGTHS:  # one causal block over prompt + chosen + prompt token + rejected
        blocks.append(((start, start + p + c + 1 + r), 0))
        start += p + c + 1 + r
    leaky = [tuple(blocks)]
    for kernel in ("loop", "mask"):
        good = score(model, shared, kernel)
        bad = score(model, PairBatch(**{**shared.__dict__, "spans": leaky}), kernel)
        n = len(records)
        torch.testing.assert_close(bad[:n], good[:n], rtol=1e-10, atol=1e-10)  # chosen come first: unaffected
        assert (bad[n:] - good[n:]).abs().max() > 1e-2


def test_unpaired_packed_equals_padded(model: PreTrainedModel) -> None:
    """KTO's batches (own completions and the KL partners'): packed log-probs equal padded ones."""
    pairs = make_pairs(model.config.vocab_size)
    records = [UnpairedRecord(r.prompt_ids, r.chosen_ids, i % 2 == 0, i, r.rejected_ids) for i, r in enumerate(pairs)]
    for kl in (False, True):
        a = collate_unpaired(records, 0, kl, "padded")
        b = collate_unpaired(records, 0, kl, "packed")
        torch.testing.assert_close(b.completion_counts(), a.completion_counts(), rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(score(model, b), score(model, a), rtol=1e-10, atol=1e-10)


def test_auto_layout_falls_back_where_span_attention_is_not_exact(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    llama = build_model(tiny_tokenizer, arch="llama")
    gemma = build_model(tiny_tokenizer, arch="gemma2")  # attention soft-capping and a 16-token window
    assert resolve_layout("auto", "shared_prefix", llama, 512) == "shared_prefix"
    assert resolve_layout("auto", "packed", llama, 512) == "packed"
    assert resolve_layout("auto", "shared_prefix", gemma, 512) == "padded"
    assert resolve_layout("auto", "padded", llama, 512) == "padded"
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(build_model(tiny_tokenizer, arch="llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert resolve_layout("auto", "shared_prefix", wrapped, 512) == "shared_prefix"  # the wrapped model decides
    with pytest.raises(ValueError, match="soft-caps"):
        resolve_layout("packed", "shared_prefix", gemma, 512)
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                                         attention_types=[[["global"], 2]], max_position_embeddings=64))  # fmt: skip
    assert resolve_layout("auto", "shared_prefix", neo, 512) == "padded"  # its attention would drop the spans
    qwen = build_model(tiny_tokenizer, arch="qwen2", sliding_window=32, use_sliding_window=True)
    with pytest.raises(ValueError, match="sliding window"):
        resolve_layout("packed", "shared_prefix", qwen, 512)


def test_span_attention_restores_the_implementation_after_an_error(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    llama = build_model(tiny_tokenizer, arch="llama")
    with pytest.raises(RuntimeError, match="without spans"), span_attention(llama):
        llama(input_ids=torch.tensor([[6, 7, 8]]))
    assert llama.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------------
# Through the loop


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", n=16)


def train_figures(model: Path, data: Path, out: Path, **extra: Any) -> list[dict[str, Any]]:
    # (BIT_EXACT: at step 1 policy = reference and every DPO margin is a tie at 0, counted in no accuracy;
    # CUDA's atomics in the span sums would break the ties either way.)
    config = run_config(extra.pop("method"), model, data, out, max_steps=3, **extra, **BIT_EXACT)
    result = posttrain.train(config)
    return [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]


@pytest.mark.parametrize(("method", "layout"), [("dpo", "shared_prefix"), ("simpo", "packed"), ("kto", "packed")])
def test_runs_in_every_layout_match_padded(
    method: str, layout: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """Three optimizer steps: every logged figure of every step agrees with the padded run (float32)."""
    runs = {
        name: train_figures(tiny_model_dir, pairs_file, tmp_path / name, method=method, layout=name)
        for name in ("padded", layout)
    }
    for a, b in zip(runs["padded"], runs[layout], strict=True):
        for key, value in a.items():
            if isinstance(value, float) and not key.endswith(("_s", "per_s", "_gb")) and key != "learning_rate":
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, a["step"])
    summary = json.loads((tmp_path / layout / "summary.json").read_text())
    assert summary["layout"] == layout


def test_gradient_checkpointing_recomputes_under_span_attention(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """Checkpointed layers recompute their attention in backward: with the shared-prefix layout that must
    still be span attention (else the recomputed rejected tokens would attend to the chosen ones)."""
    a = train_figures(tiny_model_dir, pairs_file, tmp_path / "a", method="dpo", layout="padded")
    b = train_figures(tiny_model_dir, pairs_file, tmp_path / "b", method="dpo", layout="shared_prefix",
                      gradient_checkpointing=True)  # fmt: skip
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "policy_margin", "accuracy"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (key, x["step"])


def test_an_explicit_layout_the_method_lacks_is_a_config_error(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    config = run_config("kto", tiny_model_dir, pairs_file, tmp_path / "out", layout="shared_prefix")
    with pytest.raises(ConfigError, match=r"layout: shared_prefix is not available for method kto"):
        posttrain.train(config)
    assert load(run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "o2")).layout == "auto"
    assert set(LAYOUTS) == {"padded", "packed", "shared_prefix"}


# ------------------------------------------------------------------------------------------------------
# Online: a rollout's groups share their prompt


def rollout(vocab_size: int) -> Samples:
    """Two prompts x three samples, then one prompt x two (groups as the online loop lays them out), right-padded;
    the fifth row's loss mask is off (an overlong sample masked by DAPO's filter)."""
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(6, vocab_size, (n,), generator=g).tolist())

    prompts = [ids(4), ids(2), ids(5)]
    rows = [(prompts[0], ids(n)) for n in (3, 1, 5)] + [(prompts[1], ids(n)) for n in (2, 6, 4)]
    rows += [(prompts[2], ids(n)) for n in (3, 2)]
    input_ids, attention_mask, loss_mask = pad_completions(rows, pad_id=0)
    loss_mask[4] = False
    lengths = torch.tensor([len(c) for _, c in rows], dtype=torch.float64)
    zeros = torch.zeros(len(rows), dtype=torch.float64)
    return Samples(input_ids, attention_mask, loss_mask, zeros, {}, lengths, zeros.bool())


@pytest.mark.parametrize("layout", ["packed", "shared_prefix"])
def test_online_scoring_layouts_equal_padded(model: PreTrainedModel, layout: str, tmp_path: Path) -> None:
    """Per-token log-probs and entropies in the rollout's (N, T) positions, and the gradient of a per-token
    loss, whether the rollout is scored padded, packed or with each group's prompt shared; micro-batches
    that cut a group in two (rows 2..6) included."""
    s = rollout(model.config.vocab_size)
    config = load(
        run_config("grpo", Path("m"), Path("d.jsonl"), tmp_path, rewards=[{"name": "regex_format", "pattern": "."}])
    )
    padded, other = Scorer(config, torch.device("cpu")), Scorer(config, torch.device("cpu"), layout=layout)
    weights = torch.linspace(-1, 1, s.input_ids.numel(), dtype=torch.float64).view(s.input_ids.shape)
    for rows in (torch.arange(8), torch.arange(2, 7)):
        a, b = padded(model, s, rows, entropy=True), other(model, s, rows, entropy=True)
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(b.logps, a.logps, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b.entropy, a.entropy, rtol=1e-10, atol=1e-10)
        ga = grads_of(model, (a.logps * weights[rows]).sum())
        gb = grads_of(model, (b.logps * weights[rows]).sum())
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-5 * float(ga[name].abs().max()), msg=name)
    # (a is rows 2..6) scored tokens only: rollout row 2 has 5, the masked row 4 none
    assert (a.logps[0] != 0).sum() == 5 and not a.logps[2].any()


def test_grpo_run_with_shared_prompts_matches_padded(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Three GRPO steps (beta > 0: the reference scored too) with the scripted generator: same figures."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: say it."}) + "\n" for i in range(8)))
    figures = {}
    for layout in ("padded", "auto"):
        cfg = run_config(
            "grpo",
            tiny_model_dir,
            prompts,
            tmp_path / layout,
            max_steps=3,
            layout=layout,
            beta=0.04,
            num_generations=4,
            batch_size=2,
            rewards=[{"name": "regex_format", "pattern": "^yes$"}],
        )
        cfg["data"] = {"train": str(prompts), "max_length": 64}
        result = run_online(
            load(cfg), generator_factory=lambda m, t: ScriptedGenerator(t, ["yes", "no", "maybe so"], score_model=m)
        )
        figures[layout] = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
        assert result.summary["layout"] == ("padded" if layout == "padded" else "shared_prefix")
    for a, b in zip(figures["padded"], figures["auto"], strict=True):
        for key, value in a.items():
            if isinstance(value, float) and not key.endswith(("_s", "_gb")) and key != "lr":
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, a["step"])
