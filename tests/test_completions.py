"""completions.jsonl: each online step's first samples with their texts, rewards and advantages; none with
log_completions: 0; a resumed run drops the lines after its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import write_word_prompts

from posttrain.config import ConfigError, load
from posttrain.rollout.advantages import group_advantages
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training import checkpoint
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_word_prompts(path, 8)
    return path


def config(method: str, model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "method": method, "model": str(model), "output_dir": str(out), "data": {"train": str(data), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True},
                    {"name": "regex_format", "pattern": "^no$", "fullmatch": True, "weight": 0.5, "label": "no"}],
        "num_generations": 2, "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0,
        "lr_scheduler": "constant", "beta": 0.0, **extra,
    }  # fmt: skip


def train(cfg: dict[str, Any], resume: bool = False) -> list[dict[str, Any]]:
    scripted = lambda m, t: ScriptedGenerator(t, ["yes", "no", "maybe"], score_model=m)  # noqa: E731
    run_online(load(cfg), resume=resume, generator_factory=scripted)
    path = Path(cfg["output_dir"]) / "completions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_grpo_writes_samples_with_their_group_advantages(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    rows = train(config("grpo", tiny_model_dir, prompts, tmp_path / "g", log_completions=3))
    assert [(r["step"], r["sample"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    for r in rows:
        assert r["prompt"].startswith("Question ") and r["completion"] in ("yes", "no", "maybe")
        assert r["rewards"] == {"regex_format": float(r["completion"] == "yes"), "no": float(r["completion"] == "no")}
        assert r["reward"] == pytest.approx(r["rewards"]["regex_format"] + 0.5 * r["rewards"]["no"])
        assert r["length"] >= 1 and r["truncated"] is False
    for step in (1, 2):  # samples 0 and 1 are the first group: its advantages, from its rewards
        group = [r for r in rows if r["step"] == step][:2]
        advantages = group_advantages(torch.tensor([r["reward"] for r in group], dtype=torch.float64), 2)
        assert [r["advantage"] for r in group] == pytest.approx(advantages.tolist(), abs=1e-12)


def test_ppo_rloo_and_off(tiny_model_dir: Path, prompts: Path, tmp_path: Path) -> None:
    """PPO's advantage is the mean over the completion's tokens; RLOO's is per completion; 0 writes nothing.
    The figures of metrics.jsonl keep no trace of the sampled advantages."""
    for method in ("ppo", "rloo"):
        rows = train(config(method, tiny_model_dir, prompts, tmp_path / method, max_steps=1, beta=0.02))
        assert len(rows) == 4 and all(isinstance(r["advantage"], float) for r in rows)
        lines = read_metrics(tmp_path / method / "metrics.jsonl")
        assert not any(k.startswith("_sample") for line in lines for k in line)
    assert train(config("grpo", tiny_model_dir, prompts, tmp_path / "off", log_completions=0)) == []
    with pytest.raises(ConfigError, match="log_completions: must be >= 0, got -1"):
        load(config("grpo", tiny_model_dir, prompts, tmp_path / "bad", log_completions=-1))


def test_resume_drops_the_lines_after_the_checkpoint(
    tiny_model_dir: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while saving the end state (step 3; the last checkpoint is step 2): step 3 is replayed, once."""
    cfg = config("grpo", tiny_model_dir, prompts, tmp_path / "r", max_steps=3, save_steps=2, log_completions=2)
    save = checkpoint.save_checkpoint

    def dies_at_the_end(output_dir: Path, step: int, *args: Any, **kwargs: Any) -> Path:
        if step == 3:
            raise KeyboardInterrupt("killed while saving the end state")
        return save(output_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", dies_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert (tmp_path / "r" / "completions.jsonl").read_text().count('"step": 3') == 2
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    rows = train(cfg, resume=True)
    assert [(r["step"], r["sample"]) for r in rows] == [(s, i) for s in (1, 2, 3) for i in (0, 1)]
