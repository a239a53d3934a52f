"""The online loop on a tiny model with the scripted generator (samples follow the current policy):
GRPO and RLOO raise the mean reward of a trivially learnable reward; mu = 1 keeps the ratio at 1;
tied groups teach nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import BIT_EXACT, killed_after_first_checkpoint
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.algorithms.online import GRPO
from posttrain.config import ConfigError, load
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online

CANDIDATES = ["yes", "no", "maybe"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"Question {i}: say the word.", "answer": "yes"} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def online_config(method: str, model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "method": method, "model": str(model), "output_dir": str(out),
        "data": {"train": str(data), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 4, "batch_size": 4, "max_steps": 15, "learning_rate": 3e-3,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "beta": 0.0,
    }  # fmt: skip
    config.update(extra)
    return config


def run(config: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = load(config)
    result = run_online(cfg, generator_factory=lambda m, t: ScriptedGenerator(t, CANDIDATES, score_model=m))
    return [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_reward_rises(method: str, tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    steps = run(online_config(method, tiny_model_dir, prompts_file, tmp_path / method))
    rewards = [m["reward"] for m in steps]
    # One of three candidates is rewarded: about 1/3 at first, close to 1 once the policy has learnt it.
    assert rewards[0] < 0.6 and mean(rewards[-4:]) > rewards[0] + 0.3, rewards


def test_mu_one_keeps_the_ratio_at_one(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """One optimizer step per rollout, old log-probs = current: every ratio is 1, nothing is clipped."""
    steps = run(online_config("grpo", tiny_model_dir, prompts_file, tmp_path / "r", max_steps=3, beta=0.04))
    for m in steps:
        assert m["clip_low"] == 0.0 and m["clip_high"] == 0.0
        assert m["kl"] >= 0.0


def test_tied_groups_teach_nothing(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """A reward every sample gets: all groups tie, advantages are 0, the loss is 0 and the weights stay."""
    cfg = online_config("grpo", tiny_model_dir, prompts_file, tmp_path / "t", max_steps=2)
    cfg["rewards"] = [{"name": "regex_format", "pattern": "."}]
    steps = run(cfg)
    assert all(m["tied_groups"] == 1.0 and m["loss"] == 0.0 for m in steps)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "model").state_dict()
    assert all((before[k] == after[k]).all() for k in before)


def test_online_needs_a_reward(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    cfg = online_config("grpo", tiny_model_dir, prompts_file, tmp_path / "x")
    cfg["rewards"] = []
    with pytest.raises(ConfigError, match=r"rewards: method grpo needs at least one reward"):
        posttrain.train(cfg)
    assert not (tmp_path / "x").exists()


def test_posttrain_train_runs_grpo_with_hf_generation(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """The real path: posttrain.train dispatches to the online loop, samples with model.generate, evaluates
    greedy answers on held-out prompts, and saves a model plain transformers loads."""
    cfg = online_config("grpo", tiny_model_dir, prompts_file, tmp_path / "hf", max_steps=2, beta=0.04)
    cfg["data"]["eval"] = str(prompts_file)
    cfg["generation"] = {"max_new_tokens": 6, "temperature": 1.0}
    result = posttrain.train(cfg)
    steps = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert len(steps) == 2 and all(0.0 <= m["completion_length"] <= 6 for m in steps)
    assert "reward" in result.summary["heldout_before"] and "reward" in result.summary["heldout_after"]
    AutoModelForCausalLM.from_pretrained(result.model_dir)


def yes_when_asked(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
    """1 for "yes" on prompts whose answer is yes; prompts whose answer is no always score 0 (tied)."""
    return [float(c == "yes" and a == "yes") for c, a in zip(completions, columns["answer"], strict=True)]


def test_dynamic_sampling_drops_tied_groups(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Half the prompts can never be rewarded: their groups tie. With dynamic sampling the batch is refilled
    with informative groups; with a reward nobody gets, the cap is reached and the tied batch is kept."""
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"Question {i}: say the word.", "answer": "yes" if i % 2 else "no"} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = [{"name": "test_online:yes_when_asked"}]
    extra = {"max_steps": 4, "dynamic_sampling": True, "max_resample": 6, "rewards": reward}
    steps = run(online_config("grpo", tiny_model_dir, path, tmp_path / "d", **extra))
    assert any(m["tied_groups"] > 0 for m in steps)  # the first draws do hold tied groups ...
    assert all(m["tied_groups_trained"] == 0.0 for m in steps)  # ... none is trained on ...
    assert any(m["resampled"] > 0 for m in steps)  # ... fresh prompts refill the batch, up to the cap
    assert all(m["groups"] == 4 or m["resampled"] == 6 for m in steps)
    never = [{"name": "regex_format", "pattern": "^never$"}]
    steps = run(online_config("grpo", tiny_model_dir, path, tmp_path / "n", **{**extra, "rewards": never}))
    assert all(m["resampled"] == 6 and m["groups"] == 4 and m["loss"] == 0.0 for m in steps)
    assert all(m["tied_groups_trained"] == 1.0 for m in steps)


def test_presets_carry_their_papers_settings(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """method: dr_grpo and method: dapo are GRPO with the settings of their papers as defaults; every
    GRPO key stays settable on them."""
    dr = load(online_config("dr_grpo", tiny_model_dir, prompts_file, tmp_path / "dr")).algorithm
    assert (dr.scale_rewards, dr.loss_aggregation, dr.epsilon_high, dr.beta) == ("none", "dr_grpo", 0.2, 0.0)
    raw = online_config("dapo", tiny_model_dir, prompts_file, tmp_path / "da")
    del raw["beta"]
    cfg = load({**raw, "generation": {"max_new_tokens": 20}})
    dapo = cfg.algorithm
    assert (dapo.epsilon_low, dapo.epsilon_high, dapo.beta) == (0.2, 0.28, 0.0)
    assert dapo.loss_aggregation == "dapo" and dapo.dynamic_sampling and dapo.scale_rewards == "std"
    assert dapo.masks_truncated(cfg.generation)  # overlong filtering on unless generation.mask_truncated: false
    assert not dapo.masks_truncated(load({**raw, "generation": {"mask_truncated": False}}).generation)
    assert not GRPO().masks_truncated(cfg.generation)  # plain GRPO keeps them
    # the soft overlong punishment: L_max = max_new_tokens, L_cache = a fifth of it (DAPO: 4096 of 20480)
    assert dapo.extra_rewards(cfg.generation) == [
        {"name": "overlong", "label": "soft_overlong", "max_length": 20, "cache": 4, "weight": 1.0}
    ]
    assert load({**raw, "overlong_buffer": 0}).algorithm.extra_rewards(cfg.generation) == []
    with pytest.raises(ConfigError, match=r"overlong_buffer: must be >= 0"):
        load({**raw, "overlong_buffer": -1})


def test_dapo_trains_with_its_overlong_term(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    raw = online_config("dapo", tiny_model_dir, prompts_file, tmp_path / "d", max_steps=3)
    steps = run(raw)
    assert all("reward/soft_overlong" in m and m["reward/soft_overlong"] == 0.0 for m in steps)  # short answers
    assert all(m["tied_groups_trained"] == 0.0 or m["resampled"] == 3 for m in steps)
    twice = {**raw, "rewards": [*raw["rewards"], {"name": "overlong", "max_length": 8, "cache": 2}]}
    twice["output_dir"] = str(tmp_path / "d2")  # (d holds a finished run: refused first, for another reason)
    with pytest.raises(ConfigError, match=r"rewards: method dapo adds the 'overlong' reward itself"):
        posttrain.train(twice)


def test_vllm_backend_where_it_cannot_run_is_a_one_line_error(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Here (no vllm, no GPU) `generation.backend: vllm` stops before anything is written, exit 2."""
    import yaml

    from posttrain.cli import main

    cfg = online_config("grpo", tiny_model_dir, prompts_file, tmp_path / "v", generation={"backend": "vllm"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("posttrain: error: generation.backend: vllm needs"), err
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_resume_equals_uninterrupted(
    method: str, tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill an online run right after its step-2 checkpoint and resume it: the final weights (policy and
    PPO's critic) and every later step's figures equal a straight run's (sampling seeds follow the step)."""
    import torch

    extra: dict[str, Any] = {"max_steps": 4, "save_steps": 2, "lr_scheduler": "cosine", "beta": 0.04, **BIT_EXACT}
    extra |= {"num_iterations": 2} if method == "grpo" else {"num_generations": 2, "num_mini_batches": 2}
    straight = run(online_config(method, tiny_model_dir, prompts_file, tmp_path / "straight", **extra))
    cfg = online_config(method, tiny_model_dir, prompts_file, tmp_path / "resumed", **extra)
    killed_after_first_checkpoint(lambda: run(cfg), monkeypatch)
    result = run_online(load(cfg), resume=True,
                        generator_factory=lambda m, t: ScriptedGenerator(t, CANDIDATES, score_model=m))  # fmt: skip
    resumed = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight[2:], resumed[2:], strict=True):
        assert (a["loss"], a["reward"], a["lr"]) == (b["loss"], b["reward"], b["lr"])
    from transformers import AutoModelForSequenceClassification

    parts = {
        "model": AutoModelForCausalLM,
        **({"critic": AutoModelForSequenceClassification} if method == "ppo" else {}),
    }
    for part, auto in parts.items():
        a_sd = auto.from_pretrained(tmp_path / "straight" / part).state_dict()
        b_sd = auto.from_pretrained(tmp_path / "resumed" / part).state_dict()
        assert all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd), part
    # The end state's checkpoint shares the final model's weights (one file, tests/test_shared_weights.py).
    final, ckpts = tmp_path / "resumed" / "model", tmp_path / "resumed" / "checkpoints"
    assert (final / "model.safetensors").samefile(ckpts / "step-000004" / "model.safetensors")
    assert not (final / "model.safetensors").samefile(ckpts / "step-000002" / "model.safetensors")


def test_rloo_reports_the_kl_it_folds_into_the_reward(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """Step 1 samples from the reference's own weights: the summed k1 KL is exactly 0; it moves afterwards."""
    steps = run(online_config("rloo", tiny_model_dir, prompts_file, tmp_path / "k", max_steps=3, beta=0.05))
    assert steps[0]["kl_ref"] == 0.0 and steps[-1]["kl_ref"] != 0.0
