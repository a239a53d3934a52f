"""Iterative DPO: best-vs-worst pairing by hand, and rounds that sample, save pairs, train and chain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import ON_CUDA, write_word_prompts

from posttrain.config import load
from posttrain.data.prompts import PromptRecord
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.rollout.pairs import Pair, best_worst_pairs
from posttrain.training.iterative import round_prompts, run_iterative
from posttrain.training.metrics import read_metrics


def test_pairing_and_tie_filtering_by_hand() -> None:
    """Prompt 0 rewards (0.2, 0.9, 0.4): best 1, worst 0, margin 0.7. Prompt 1 (0.5, 0.55, 0.5): margin
    0.05, dropped at threshold 0.1, kept at 0. Equal best rewards: the first sample wins."""
    rewards = [0.2, 0.9, 0.4, 0.5, 0.55, 0.5]
    assert best_worst_pairs(rewards, 3, tie_threshold=0.1) == [Pair(0, 1, 0, pytest.approx(0.7))]
    kept = best_worst_pairs(rewards, 3)
    assert [(p.prompt_index, p.chosen, p.rejected) for p in kept] == [(0, 1, 0), (1, 4, 3)]
    assert best_worst_pairs([1.0, 1.0, 0.0], 3) == [Pair(0, 0, 2, 1.0)]
    with pytest.raises(ValueError, match="multiple of n"):
        best_worst_pairs([1.0, 0.0, 1.0], 2)


def test_rounds_save_pairs_and_train(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    write_word_prompts(path, 8)
    cfg: dict[str, Any] = {
        "method": "iterative_dpo", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "it"),
        "data": {"train": str(path), "eval": str(path), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 3, "rounds": 2, "steps_per_round": 2, "batch_size": 4, "learning_rate": 1e-3,
        "reference_update": "initial",
    }  # fmt: skip
    factory = lambda m, t: ScriptedGenerator(t, ["yes", "no", "maybe"], score_model=m)  # noqa: E731
    result = run_iterative(load(cfg), generator_factory=factory)
    rounds = result.summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in (1, 2):
        rows = [json.loads(line) for line in (tmp_path / "it" / f"round-{r}" / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == rounds[r - 1]["pairs"] >= 4
        assert all(row["chosen"] == "yes" and row["score_chosen"] > row["score_rejected"] for row in rows)
        train = read_metrics(tmp_path / "it" / f"round-{r}" / "train" / "metrics.jsonl")
        assert [m["step"] for m in train if m["split"] == "train"] == [1, 2]
    # Round 2 started from round 1's model; its reference stayed the initial model.
    round2 = load(tmp_path / "it" / "round-2" / "train" / "config.yaml")
    assert round2.model.endswith("round-1/train/model") and round2.reference.model == str(tiny_model_dir)
    assert (result.model_dir / "config.json").exists()
    # Held-out answers are scored before each round and after the last (greedy with the HF generator).
    assert result.summary["heldout_before"] == rounds[0]["heldout_at_start"]
    assert (
        set(rounds[1]["heldout_at_start"]) == set(result.summary["heldout_after"]) >= {"reward", "reward/regex_format"}
    )
    # Peak memory over every round (the GPU's too on a CUDA machine: tests/test_memory.py).
    assert result.summary["peak_rss_gb"] > 0 and ("peak_gpu_allocated_gb" in result.summary) == ON_CUDA


def test_round_prompts_are_fresh_each_round_and_reproducible() -> None:
    prompts = [PromptRecord((1,), f"q{i}", i) for i in range(10)]
    assert round_prompts(prompts, None, 0, 1) == prompts and round_prompts(prompts, 10, 0, 1) == prompts
    first, second = round_prompts(prompts, 4, 0, 1), round_prompts(prompts, 4, 0, 2)
    assert len(first) == len({p.index for p in first}) == 4 and first != second
    assert round_prompts(prompts, 4, 0, 1) == first  # the same seed and round: the same prompts
