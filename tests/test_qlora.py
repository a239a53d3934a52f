"""QLoRA (``lora.load_in_4bit``) with bitsandbytes on CPU: the base really is 4-bit NF4, no-grad forwards
compute what the training forward computes, the merged save is a plain model computing exactly what the
4-bit model with adapters computes, and DPO, GRPO and reward models train, resume and save with it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import (
    BIT_EXACT,
    assert_plain_transformers_loads,
    assert_same_causal_lm_run,
    first_bundled_pairs,
    killed_after_first_checkpoint,
    run_config,
    write_word_prompts,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import posttrain
from posttrain.config import ConfigError, LoraConfig, load
from posttrain.fixtures import build_model, build_tokenizer
from posttrain.model import lora
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online
from posttrain.training.pairs import PairTask
from posttrain.training.reference import weights_digest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
QLORA = {"r": 8, "alpha": 16.0, "load_in_4bit": True}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def load_4bit(model_dir: Path, **lora_keys: Any) -> torch.nn.Module:
    """The tiny model with a 4-bit base and fresh adapters whose B is moved off zero (so they matter)."""
    config = LoraConfig(r=4, alpha=8.0, load_in_4bit=True, **lora_keys)
    model = lora.apply_lora(load_causal_lm(str(model_dir), quantized=lora.four_bit(config, "fp32", CPU)), config)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


IDS = torch.randint(10, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def test_the_base_is_4bit_nf4_and_only_the_adapters_train(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    model = load_4bit(tiny_model_dir)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the two decoder layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)  # double quantization of the absmax constants
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    full = load_causal_lm(str(tiny_model_dir), trainable=False)
    with lora.adapters_off(model)():
        gap = (logits(model, IDS) - logits(full, IDS)).abs().max()
    assert 1e-4 < gap < 0.1  # NF4's rounding: visible, small
    # So a cached reference of the 4-bit base is not the full-precision model's (nor the other way round).
    assert weights_digest(model) != weights_digest(full)


def test_no_grad_forwards_compute_the_training_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval-mode no-grad forwards (reference, old policy, sampling) equal the training forward. Without
    ``exact_4bit_kernels``, bitsandbytes repacks the weights on AVX512-BF16 CPUs and computes those forwards
    in bf16 (and fails outright on layers narrower than its 64-wide blocks, as in the 32-wide tiny model)."""
    tokenizer = build_tokenizer("chatml")
    model_dir = tmp_path / "wider"
    build_model(tokenizer, hidden_size=64, intermediate_size=128).save_pretrained(model_dir)
    model = load_4bit(model_dir)
    model.train()
    trained = model(input_ids=IDS).logits.detach()
    model.eval()
    torch.testing.assert_close(logits(model, IDS), trained, rtol=0, atol=1e-6)
    monkeypatch.setattr("posttrain.model.load.exact_4bit_kernels", lambda m: m)
    raw = load_4bit(model_dir).eval()
    if next(m for m in raw.modules() if hasattr(m, "support_avx512bf16_for_cpu")).support_avx512bf16_for_cpu:
        assert (logits(raw, IDS) - trained).abs().max() > 1e-4  # what the switch guards against, on this CPU


@pytest.mark.parametrize(
    ("arch", "targets"), [("llama", "all-linear"), ("qwen2", "all-linear"), ("llama", "q_proj,v_proj")]
)
def test_merged_is_a_plain_model_computing_the_4bit_model(
    arch: str, targets: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Every 4-bit weight dequantized, the deltas of the adapted ones added (qwen2: tied embeddings; a
    target subset leaves 4-bit layers without adapters, dequantized as they are)."""
    model_dir = tiny_model_dir
    if arch != "llama":
        tokenizer = build_tokenizer("chatml")
        model_dir = tmp_path / arch
        build_model(tokenizer, arch=arch).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    model = load_4bit(model_dir, target_modules=targets)
    model.generation_config.max_new_tokens, model.generation_config.eos_token_id = 77, [2, 3]
    expected = logits(model, IDS)
    merged = lora.merged(model)
    assert (merged.generation_config.max_new_tokens, merged.generation_config.eos_token_id) == (77, [2, 3])
    assert type(merged) is type(lora.base_model(model)) and not hasattr(merged.config, "quantization_config")
    assert all(type(m) is not type(model) and "Linear4bit" not in type(m).__name__ for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDS), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(model, IDS), expected, rtol=0, atol=0)  # the model itself untouched
    merged.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded, IDS), expected, rtol=0, atol=2e-6)


def test_qlora_dpo_trains_and_saves_a_plain_model(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    cfg = run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "run", lora=QLORA, max_steps=10, learning_rate=1e-2)
    result = posttrain.train(cfg)
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert after["loss"] < before["loss"] - 0.02 and after["accuracy"] > before["accuracy"] + 0.5
    # The reference is the 4-bit base (the adapters off): the same log-probs before and after training.
    assert after["ref_chosen_logps"] == pytest.approx(before["ref_chosen_logps"], rel=1e-6)
    assert "quantization_config" not in json.loads((result.model_dir / "config.json").read_text())
    assert_plain_transformers_loads(result.model_dir)
    saved = AutoModelForCausalLM.from_pretrained(result.model_dir)
    config = load(result.output_dir / "config.yaml")
    task = PairTask(config, load_tokenizer(str(result.model_dir)), CPU)
    records, _ = task.load_records(str(pairs_file), "train")
    with torch.no_grad():
        scored = torch.cat([task.score(saved, task.collate(records[i : i + 8])).chosen_logps for i in range(0, 32, 8)])
    assert float(scored.mean()) == pytest.approx(after["policy_chosen_logps"], rel=1e-5)


def test_qlora_resume_equals_uninterrupted(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint holds the adapters; resuming quantizes the base again, to the same 4-bit weights."""
    extra = {"lora": QLORA, "max_steps": 4, "save_steps": 2, "learning_rate": 1e-2, **BIT_EXACT}
    straight = posttrain.train(run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "straight", **extra))
    cfg = run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "resumed", **extra)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    resumed = posttrain.train(cfg, resume=True)
    assert_same_causal_lm_run(straight, resumed)


def test_qlora_grpo_starts_at_the_reference_and_saves_a_plain_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """GRPO with a KL penalty: the reference is the 4-bit base, so the first step's KL is exactly 0 and no
    ratio is clipped (the no-grad old-policy and reference forwards equal the training one)."""
    prompts = tmp_path / "prompts.jsonl"
    write_word_prompts(prompts, 16)
    raw = {
        "method": "grpo", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(prompts), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 4, "batch_size": 4, "max_steps": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
        "lr_scheduler": "constant", "beta": 0.04, "lora": QLORA, "gradient_checkpointing": True,
    }  # fmt: skip
    factory = lambda m, t: ScriptedGenerator(t, ["yes", "no", "maybe"], score_model=m)  # noqa: E731
    result = run_online(load(raw), generator_factory=factory)
    steps = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert all(m["clip_low"] == 0.0 and m["clip_high"] == 0.0 for m in steps)
    assert steps[-1]["kl"] > 0 and sum(m["reward"] for m in steps[-3:]) / 3 > steps[0]["reward"]
    assert "quantization_config" not in json.loads((result.model_dir / "config.json").read_text())
    assert_plain_transformers_loads(result.model_dir)


def test_qlora_reward_model_saves_a_plain_classifier(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """The new score head stays full precision and trains whole (peft's modules_to_save) next to the adapters."""
    cfg = run_config("reward", tiny_model_dir, pairs_file, tmp_path / "run", lora=QLORA, max_steps=4)
    result = posttrain.train(cfg)
    saved = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert not [name for name in saved.state_dict() if "lora" in name or "modules_to_save" in name]
    assert "quantization_config" not in json.loads((result.model_dir / "config.json").read_text())
    assert result.summary["heldout_after"]["loss"] < result.summary["heldout_before"]["loss"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"distributed": {"strategy": "fsdp2"}}, r"^lora.load_in_4bit: not with distributed.strategy: fsdp2 \("),
        ({"generation": {"backend": "vllm"}}, r"^lora.load_in_4bit: not with generation.backend: vllm \(not wired\)"),
    ],
)
def test_what_qlora_cannot_do_is_refused_in_one_line(
    extra: dict[str, Any], message: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    cfg = run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "run", lora=QLORA, **extra)
    with pytest.raises(ConfigError, match=message):
        posttrain.train(cfg)
    assert not (tmp_path / "run").exists()


def test_qlora_without_bitsandbytes_is_a_one_line_error(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    missing = lambda name, *a: None if name == "bitsandbytes" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    cfg = run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "run", lora=QLORA)
    with pytest.raises(ConfigError, match=r"^lora.load_in_4bit: QLoRA needs the bitsandbytes package: pip install"):
        posttrain.train(cfg)
    assert not (tmp_path / "run").exists()


def test_qlora_under_bf16_dequantizes_to_bf16_and_saves_fp32(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """``precision: bf16``: the 4-bit weights are dequantized to bf16 for each matmul; the saved model is fp32."""
    import bitsandbytes as bnb

    arguments = lora.four_bit(LoraConfig(load_in_4bit=True), "bf16", CPU)
    assert arguments["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    model = load_causal_lm(str(tiny_model_dir), quantized=arguments)
    assert {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.bfloat16}
    cfg = run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "run", lora=QLORA, max_steps=6, learning_rate=1e-2)
    result = posttrain.train({**cfg, "precision": "bf16"})
    assert result.summary["heldout_after"]["loss"] < result.summary["heldout_before"]["loss"]
    saved = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert {p.dtype for p in saved.parameters()} == {torch.float32}


def test_qlora_with_a_bitsandbytes_too_old_for_cpus_is_a_one_line_error(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5" if name == "bitsandbytes" else real(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "run", lora=QLORA)
    with pytest.raises(ConfigError, match=r"^lora.load_in_4bit: bitsandbytes 0.45.5 has no CPU 4-bit layers"):
        posttrain.train(cfg)
    assert not (tmp_path / "run").exists()
