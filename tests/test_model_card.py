"""The model card: model/README.md in the Hugging Face convention, written where the final model is saved,
for offline and online runs and for a LoRA adapter save; the front matter names a hub base model only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from support import first_bundled_pairs, run_config, write_word_prompts

import posttrain
from posttrain.config import load
from posttrain.report.card import card, metadata
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training.online import run_online


def read_card(model_dir: Path) -> tuple[dict[str, Any], str]:
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_offline_run_writes_a_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    result = posttrain.train(run_config("dpo", tiny_model_dir, pairs, tmp_path / "dpo", max_steps=2, beta=0.25))
    meta, body = read_card(result.model_dir)
    assert meta["library_name"] == "transformers" and meta["tags"] == ["posttrain", "dpo"]
    assert "base_model" not in meta and "license" not in meta and "datasets" not in meta  # a local model, local data
    assert "arXiv:2305.18290" in body and "| beta | 0.25 |" in body and "| optimizer steps | 2 |" in body
    after = result.summary["heldout_after"]["policy_margin"]
    assert f"| policy_margin | {result.summary['heldout_before']['policy_margin']:.4g} | {after:.4g} |" in body


def test_online_run_writes_a_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    write_word_prompts(prompts, 4)
    config = {
        "method": "grpo", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "grpo"),
        "data": {"train": str(prompts), "eval": str(prompts), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 2, "batch_size": 4, "max_steps": 1, "learning_rate": 1e-3,
    }  # fmt: skip
    scripted = lambda m, t: ScriptedGenerator(t, ["yes", "no"], score_model=m)  # noqa: E731
    result = run_online(load(config), generator_factory=scripted)
    meta, body = read_card(result.model_dir)
    assert meta["tags"] == ["posttrain", "grpo"] and meta["pipeline_tag"] == "text-generation"
    assert "arXiv:2402.03300" in body and "| num_generations | 2 |" in body and "| reward |" in body
    assert "regex_format" in body  # the rewards it was trained on


def test_lora_adapter_save_is_a_peft_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    config = run_config("dpo", tiny_model_dir, pairs, tmp_path / "lora", max_steps=1, lora={"r": 4, "save": "adapter"})
    result = posttrain.train(config)
    meta, body = read_card(result.model_dir)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "AutoPeftModelForCausalLM" in body and "| lora.r | 4 |" in body
    assert (result.model_dir / "adapter_config.json").is_file()


def test_hub_names_only(tmp_path: Path) -> None:
    """The embedded model is its hub repository (with its license); a hub data set is listed, a file is not;
    a model saved by an earlier stage passes its card's base model and license on."""
    raw = {"method": "dpo", "model": "embedded:smollm2-135m-instruct", "output_dir": str(tmp_path / "out"),
           "data": {"train": "trl-lib/ultrafeedback_binarized", "eval": str(tmp_path / "heldout.jsonl")}}  # fmt: skip
    meta = metadata(load(raw))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    stage = tmp_path / "sft" / "model"
    stage.mkdir(parents=True)
    (stage / "README.md").write_text(card(load(raw), {}, "sft"))
    meta = metadata(load({**raw, "model": str(stage), "method": "kto"}))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["posttrain", "kto"]
