"""LoRA through peft: the adapter-disabled policy is the reference (equal to a frozen copy, before and
after training), merged saves load in plain transformers, adapter saves and resume work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support import BIT_EXACT, assert_same_causal_lm_run, killed_after_first_checkpoint, run_config
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.config import LoraConfig, load
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.model.lora import adapters_off, apply_lora
from posttrain.training.pairs import PairTask
from posttrain.training.reference import FrozenReference, weights_digest

pytest.importorskip("peft")
BUNDLED = Path(posttrain.__file__).parent / "bundled" / "prefs_train.jsonl"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:32]))
    return path


def lora_config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    extra = {"lora": {"r": 8, "alpha": 16.0}, "max_steps": 10, "learning_rate": 1e-2, **extra}
    return run_config("dpo", model, data, out, **extra)


def _pair_logps(task: PairTask, model: torch.nn.Module, records: list[Any], context: Any = None) -> torch.Tensor:
    ref = FrozenReference(model, task.score, context) if context else FrozenReference(model, task.score)
    return torch.cat([ref.logps(task.collate(records[i : i + 8])).chosen_logps for i in range(0, 16, 8)])


def test_adapter_disabled_reference_equals_frozen_copy(tiny_model_dir: Path, pairs_file: Path) -> None:
    """At step 0 and after the adapters moved, the adapters-off policy scores exactly like the base."""
    config = load(lora_config(tiny_model_dir, pairs_file, Path("unused")))
    task = PairTask(config, load_tokenizer(config.model), torch.device("cpu"))
    records, _ = task.load_records(str(pairs_file), "train")
    frozen = load_causal_lm(config.model, trainable=False)
    assert config.lora is not None
    policy = apply_lora(load_causal_lm(config.model), config.lora)
    expected = _pair_logps(task, frozen, records)
    torch.testing.assert_close(_pair_logps(task, policy, records, adapters_off(policy)), expected, rtol=0, atol=0)
    with torch.no_grad():  # move every adapter: the policy changes, the adapters-off reference does not
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(0.5)
    assert not torch.allclose(_pair_logps(task, policy, records), expected)
    torch.testing.assert_close(_pair_logps(task, policy, records, adapters_off(policy)), expected, rtol=0, atol=0)
    assert weights_digest(policy) == weights_digest(frozen)  # same base weights, same reference cache key


def test_lora_dpo_trains_and_saves_merged(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    result = posttrain.train(lora_config(tiny_model_dir, pairs_file, tmp_path / "run"))
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert after["loss"] < before["loss"] - 0.02 and after["accuracy"] > before["accuracy"] + 0.5
    # The reference stayed the starting model: its log-probs at the end equal those at the start.
    assert after["ref_chosen_logps"] == pytest.approx(before["ref_chosen_logps"], rel=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)  # a plain model, no peft needed
    assert not any("lora" in n for n in merged.state_dict())
    config = load(result.output_dir / "config.yaml")
    task = PairTask(config, load_tokenizer(str(result.model_dir)), torch.device("cpu"))
    records, _ = task.load_records(str(pairs_file), "train")
    scored = torch.cat([task.score(merged, task.collate(records[i : i + 8])).chosen_logps for i in range(0, 32, 8)])
    assert float(scored.mean()) == pytest.approx(after["policy_chosen_logps"], rel=1e-5)


def test_lora_adapter_only_save(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    cfg = lora_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2)
    cfg["lora"] = {"r": 4, "save": "adapter", "target_modules": "q_proj,v_proj"}
    result = posttrain.train(cfg)
    assert (result.model_dir / "adapter_config.json").exists()
    assert (result.model_dir / "adapter_model.safetensors").exists()
    assert not (result.model_dir / "model.safetensors").exists()


def test_lora_resume_equals_uninterrupted(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"max_steps": 4, "save_steps": 2, **BIT_EXACT}
    straight = posttrain.train(lora_config(tiny_model_dir, pairs_file, tmp_path / "straight", **extra))
    cfg = lora_config(tiny_model_dir, pairs_file, tmp_path / "resumed", **extra)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    resumed = posttrain.train(cfg, resume=True)
    assert_same_causal_lm_run(straight, resumed)


def test_lora_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"lora.r: must be >= 1, got 0"):
        LoraConfig(r=0)


def test_adapter_off_reference_ignores_dropout(tmp_path: Path, pairs_file: Path) -> None:
    """The LoRA reference is the TRAINING policy with adapters off: it must still score with dropout off."""
    from posttrain.fixtures import build_model, build_tokenizer

    tok = build_tokenizer("chatml")
    model_dir = tmp_path / "dropout-model"
    build_model(tok, attention_dropout=0.3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = load(lora_config(model_dir, pairs_file, Path("unused")))
    task = PairTask(config, load_tokenizer(config.model), torch.device("cpu"))
    records, _ = task.load_records(str(pairs_file), "train")
    assert config.lora is not None
    policy = apply_lora(load_causal_lm(config.model), config.lora)
    policy.train()
    first = _pair_logps(task, policy, records, adapters_off(policy))
    torch.testing.assert_close(_pair_logps(task, policy, records, adapters_off(policy)), first, rtol=0, atol=0)
    assert policy.training  # the policy's own mode is restored
