"""Iterative DPO: best-vs-worst pairing by hand, and rounds that sample, save pairs, train and chain."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support import BIT_EXACT, ON_CUDA, assert_same_causal_lm_run, write_word_prompts

from posttrain.config import ConfigError, load
from posttrain.data.prompts import PromptRecord
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.rollout.pairs import Pair, best_worst_pairs
from posttrain.training import checkpoint, first_round
from posttrain.training.first_round import shared_first_rounds
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


def test_k_best_against_k_worst_by_hand() -> None:
    """Prompt 0 (0.9, 0.1, 0.5, 0.6, 0.3, 0.8), k = 3: ranked best 0 (0.9), 5 (0.8), 3 (0.6); worst 1 (0.1),
    4 (0.3), 2 (0.5): pairs (0, 1) 0.8, (5, 4) 0.5, (3, 2) 0.1, the last dropped at threshold 0.2 alone.
    Prompt 1 (1, 0.5, 0.5, 0): k = 2 gives (0, 3) and (1, 1), the second a sample against itself: dropped."""
    rewards = [0.9, 0.1, 0.5, 0.6, 0.3, 0.8]
    got = [(p.chosen, p.rejected, round(p.margin, 6)) for p in best_worst_pairs(rewards, 6, per_prompt=3)]
    assert got == [(0, 1, 0.8), (5, 4, 0.5), (3, 2, 0.1)]
    assert [(p.chosen, p.rejected) for p in best_worst_pairs(rewards, 6, 0.2, per_prompt=3)] == [(0, 1), (5, 4)]
    assert best_worst_pairs([1.0, 0.5, 0.5, 0.0], 4, per_prompt=2) == [Pair(0, 0, 3, 1.0)]
    assert best_worst_pairs(rewards, 6, per_prompt=1) == [Pair(0, 0, 1, pytest.approx(0.8))]
    with pytest.raises(ValueError, match="per_prompt <= n // 2 = 3, got 4"):
        best_worst_pairs(rewards, 6, per_prompt=4)


def two_rounds(model_dir: Path, tmp_path: Path, out: str, **extra: Any) -> dict[str, Any]:
    path = write_word_prompts(tmp_path / "prompts.jsonl", 8)
    return {
        "method": "iterative_dpo", "model": str(model_dir), "output_dir": str(tmp_path / out),
        "data": {"train": str(path), "eval": str(path), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 3, "rounds": 2, "steps_per_round": 2, "batch_size": 4, "learning_rate": 1e-3,
        "reference_update": "initial", **extra,
    }  # fmt: skip


def factory(model: Any, tokenizer: Any) -> ScriptedGenerator:
    return ScriptedGenerator(tokenizer, ["yes", "no", "maybe"], score_model=model)


def test_rounds_save_pairs_and_train(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run_iterative(load(two_rounds(tiny_model_dir, tmp_path, "it")), generator_factory=factory)
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
    # The run's model is the last round's, its weights stored once (a hard link) and its card its own file.
    last = tmp_path / "it" / "round-2" / "train" / "model"
    assert (tmp_path / "it" / "model" / "model.safetensors").samefile(last / "model.safetensors")
    assert (tmp_path / "it" / "model" / "README.md").stat().st_nlink == 1
    # Held-out answers are scored before each round and after the last (greedy with the HF generator).
    assert result.summary["heldout_before"] == rounds[0]["heldout_at_start"]
    assert (
        set(rounds[1]["heldout_at_start"]) == set(result.summary["heldout_after"]) >= {"reward", "reward/regex_format"}
    )
    # Peak memory over every round (the GPU's too on a CUDA machine: tests/test_memory.py).
    assert result.summary["peak_rss_gb"] > 0 and ("peak_gpu_allocated_gb" in result.summary) == ON_CUDA


def test_pairs_per_prompt_pairs_the_k_best_against_the_k_worst(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = two_rounds(tiny_model_dir, tmp_path, "k2", num_generations=4, pairs_per_prompt=2, rounds=1)
    run_iterative(load(cfg), generator_factory=factory)
    rows = [json.loads(line) for line in (tmp_path / "k2" / "round-1" / "pairs.jsonl").read_text().splitlines()]
    per_prompt = Counter(row["prompt"] for row in rows)
    assert max(per_prompt.values()) == 2 and len(rows) <= 2 * 8  # two pairs where two answers say yes
    assert all(row["chosen"] == "yes" and row["score_chosen"] > row["score_rejected"] for row in rows)


def test_rpo_alpha_gives_each_rounds_dpo_run_its_nll_term(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Iterative RPO (Pang et al. 2024): the key reaches the round's DPO run, which logs the NLL term."""
    run_iterative(load(two_rounds(tiny_model_dir, tmp_path, "rpo", rounds=1, rpo_alpha=1.0)), generator_factory=factory)
    assert load(tmp_path / "rpo" / "config.yaml").algorithm.rpo_alpha == 1.0
    assert load(tmp_path / "rpo" / "round-1" / "train" / "config.yaml").algorithm.rpo_alpha == 1.0
    train = read_metrics(tmp_path / "rpo" / "round-1" / "train" / "metrics.jsonl")
    assert all(m["nll"] > 0 for m in train if m["split"] == "train")


def test_round_prompts_are_fresh_each_round_and_reproducible() -> None:
    prompts = [PromptRecord((1,), f"q{i}", i) for i in range(10)]
    assert round_prompts(prompts, None, 0, 1) == prompts and round_prompts(prompts, 10, 0, 1) == prompts
    first, second = round_prompts(prompts, 4, 0, 1), round_prompts(prompts, 4, 0, 2)
    assert len(first) == len({p.index for p in first}) == 4 and first != second
    assert round_prompts(prompts, 4, 0, 1) == first  # the same seed and round: the same prompts


def test_a_run_killed_in_round_2_resumes_from_its_last_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after round 2's first checkpoint: a plain start is refused, a changed config too; ``--resume``
    keeps round 1 and round 2's pairs (the model is sampled only for the closing held-out pass) and continues
    round 2's offline run from its checkpoint: the same model and losses as a run never stopped. With
    ``keep_resumable`` a finished round's checkpoints keep no training state (it is never resumed), so the
    run holds one resumable checkpoint however many rounds it trained."""
    cfg = two_rounds(tiny_model_dir, tmp_path, "it", save_steps=1, keep_resumable=1, **BIT_EXACT)
    straight = run_iterative(load({**cfg, "output_dir": str(tmp_path / "straight")}), generator_factory=factory)
    save, saves = checkpoint.save_checkpoint, []

    def save_then_die(*args: Any, **kwargs: Any) -> Path:
        saves.append(save(*args, **kwargs))
        if len(saves) == 3:  # round 1 saved steps 1 and 2; round 2 its step 1
            raise KeyboardInterrupt("killed")
        return saves[-1]

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_iterative(load(cfg), generator_factory=factory)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert saves[-1].relative_to(tmp_path / "it").as_posix() == "round-2/train/checkpoints/step-000001"
    resumable = {p.relative_to(tmp_path / "it").as_posix() for p in saves if checkpoint.resumable(p)}
    assert resumable == {"round-2/train/checkpoints/step-000001"}  # round 1's: models only
    assert all((p / "model.safetensors").exists() for p in saves)
    with pytest.raises(ConfigError, match=r"in round-2\); pass --resume to continue that run"):
        run_iterative(load(cfg), generator_factory=factory)
    with pytest.raises(ConfigError, match=r"--resume: the config differs .*learning_rate"):
        run_iterative(load({**cfg, "learning_rate": 2e-3}), resume=True, generator_factory=factory)
    sampled: list[int] = []
    counting = lambda m, t: (sampled.append(1), factory(m, t))[1]  # noqa: E731
    resumed = run_iterative(load(cfg), resume=True, generator_factory=counting)
    assert len(sampled) == 1 and resumed.summary["rounds"] == straight.summary["rounds"]
    assert_same_causal_lm_run(straight, resumed)
    rounds = [tmp_path / "it" / f"round-{r}" / "train" for r in (1, 2)]
    assert not any(checkpoint.resumable(path) for r in rounds for _, path in checkpoint.saved(r))


def test_a_round_killed_while_sampling_samples_again(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A round folder without its round.json (killed while writing its pairs) is removed and sampled again."""
    cfg = two_rounds(tiny_model_dir, tmp_path, "it", **BIT_EXACT)
    straight = run_iterative(load({**cfg, "output_dir": str(tmp_path / "straight")}), generator_factory=factory)
    calls: list[int] = []

    def dies_in_round_2(model: Any, tokenizer: Any) -> ScriptedGenerator:
        calls.append(1)
        if len(calls) == 2:
            (tmp_path / "it" / "round-2").mkdir()
            (tmp_path / "it" / "round-2" / "pairs.jsonl").write_text('{"prompt": "half a')
            raise KeyboardInterrupt("killed")
        return factory(model, tokenizer)

    with pytest.raises(KeyboardInterrupt):
        run_iterative(load(cfg), generator_factory=dies_in_round_2)
    resumed = run_iterative(load(cfg), resume=True, generator_factory=factory)
    assert resumed.summary["rounds"] == straight.summary["rounds"]
    assert (tmp_path / "it" / "round-2" / "pairs.jsonl").read_text() == (
        tmp_path / "straight" / "round-2" / "pairs.jsonl"
    ).read_text()
    assert_same_causal_lm_run(straight, resumed)


def test_the_first_round_key_leaves_out_only_what_the_training_reads(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Beta, the loss, the learning rate, the rounds and where the run writes do not change round 1's pairs;
    the seed, the samples per prompt, the sampling, the rewards and the starting weights do."""
    cfg = two_rounds(tiny_model_dir, tmp_path, "a")
    name = first_round.key(load(cfg), "weights", "data")
    same = {"beta": 0.5, "loss": "ipo", "learning_rate": 3e-4, "rounds": 4, "output_dir": str(tmp_path / "b"),
            "steps_per_round": 7, "save_steps": 2, "keep_resumable": 1}  # fmt: skip
    assert first_round.key(load({**cfg, **same}), "weights", "data") == name
    assert first_round.key(load({**cfg, "rpo_alpha": 1.0}), "weights", "data") == name
    other = [{"seed": 1}, {"num_generations": 4}, {"generation": {"temperature": 0.7}}, {"tie_threshold": 0.1},
             {"rewards": [{"name": "regex_format", "pattern": "^no$"}]}, {"prompts_per_round": 3},
             {"precision": "bf16"}, {"generation": {"max_new_tokens": 5}},
             {"data": {**cfg["data"], "max_length": 32}}]  # fmt: skip
    assert all(first_round.key(load({**cfg, **change}), "weights", "data") != name for change in other)
    four = {**cfg, "num_generations": 4}
    assert first_round.key(load({**four, "pairs_per_prompt": 2}), "w", "d") != first_round.key(load(four), "w", "d")
    assert first_round.key(load(cfg), "other weights", "data") != name
    assert first_round.key(load(cfg), "weights", "edited data") != name


def test_runs_that_would_sample_the_same_first_round_share_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Inside ``shared_first_rounds`` (the frontier's), a run whose first round has the key of one already
    sampled copies its pairs and figures instead of sampling (the generator is not built for it); a run with
    another seed samples its own; outside, nothing is shared or kept."""
    folder, calls = tmp_path / "rounds", []
    counting = lambda m, t: (calls.append(1), factory(m, t))[1]  # noqa: E731
    cfg = two_rounds(tiny_model_dir, tmp_path, "a")
    logged: list[str] = []
    with shared_first_rounds(folder), pytest.MonkeyPatch.context() as patch:
        patch.setattr("posttrain.training.iterative.tqdm.write", logged.append)
        run_iterative(load(cfg), generator_factory=counting)
        assert len(calls) == 3  # round 1, round 2, the held-out answers after the last
        b = run_iterative(load({**cfg, "output_dir": str(tmp_path / "b"), "beta": 0.3, "learning_rate": 2e-3,
                                "rounds": 1}), generator_factory=counting)  # fmt: skip
        assert len(calls) == 4  # only the held-out answers after its one round
        assert any(line.startswith("round 1: pairs reused from ") for line in logged)
        run_iterative(load({**cfg, "output_dir": str(tmp_path / "c"), "seed": 1}), generator_factory=counting)
        assert len(calls) == 7
    for file in first_round.FILES:
        assert (tmp_path / "b" / "round-1" / file).read_text() == (tmp_path / "a" / "round-1" / file).read_text()
    assert b.summary["rounds"][0]["pairs"] >= 4 and len(list(folder.iterdir())) == 2  # a's (b's) and c's
    run_iterative(load({**cfg, "output_dir": str(tmp_path / "d")}), generator_factory=counting)
    assert len(calls) == 10 and len(list(folder.iterdir())) == 2
