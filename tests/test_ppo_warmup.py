"""PPO's critic warm-up (``critic_warmup_steps``): the first steps train the critic alone. The policy's
weights are bit-identical to the starting model's through the warm-up while the critic's move; the next
step moves the policy; beta holds; a resume in the middle of the warm-up equals a straight run; the step
still reads the device once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support import BIT_EXACT, killed_after_first_checkpoint, write_word_prompts
from test_ppo import CANDIDATES, ppo_config, run
from test_syncs import counting_reads, reads_between_steps
from transformers import AutoModelForCausalLM

from posttrain.config import ConfigError, load
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training import checkpoint
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_word_prompts(path, 16)
    return path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


@pytest.mark.parametrize("share_trunk", [False, True])
def test_warmup_trains_the_critic_alone(
    share_trunk: bool, tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """critic_warmup_steps 2 of 3 steps, a checkpoint after each: the policy of steps 1 and 2 equals the
    starting model bit for bit, the critic of step 2 differs from step 1's (a shared head: from its zero
    start too), the final policy (step 3) differs; steps 1-2 log critic_warmup 1 and no policy figures."""
    out = tmp_path / "run"
    run(ppo_config(tiny_model_dir, prompts_file, out, max_steps=3, save_steps=1, critic_warmup_steps=2,
                   share_trunk=share_trunk))  # fmt: skip
    start = weights(tiny_model_dir)
    assert same(weights(step_dir(out, 1)), start) and same(weights(step_dir(out, 2)), start)
    assert not same(weights(out / "model"), start)
    critics = [checkpoint.load_state(step_dir(out, k))["critic"] for k in (1, 2)]
    assert not same(*critics)
    if share_trunk:
        assert critics[0]["head.weight"].abs().sum() > 0  # (the head starts at zero)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if m["split"] == "train"]
    assert [m["critic_warmup"] for m in steps] == [1, 1, 0]
    for m in steps[:2]:
        assert "policy_loss" not in m and "clip_low" not in m and m["grad_norm"] == 0.0  # (no policy gradient)
        assert m["value_loss"] > 0 and m["loss"] == pytest.approx(0.1 * m["value_loss"])  # vf_coef x value loss
    assert "policy_loss" in steps[2] and "clip_low" in steps[2]


def test_warmup_steps_checked(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^critic_warmup_steps: must be >= 0, got -1$"):
        load(ppo_config(tiny_model_dir, prompts_file, tmp_path / "x", critic_warmup_steps=-1))


def test_resume_inside_the_warmup_equals_a_straight_run(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the step-2 checkpoint of a 3-step warm-up: the resumed step 3 is still a warm-up step,
    and steps 3-5 (figures, final policy and critic) equal a straight run's. The adaptive KL controller holds
    beta through the warm-up (logged beta: the one each step used), and moves it after step 4."""
    extra: dict[str, Any] = {"max_steps": 5, "save_steps": 2, "critic_warmup_steps": 3, "adaptive_kl": True,
                             "kl_target": 0.01, "lr_scheduler": "cosine", **BIT_EXACT}  # fmt: skip
    straight = run(ppo_config(tiny_model_dir, prompts_file, tmp_path / "straight", **extra))
    cfg = ppo_config(tiny_model_dir, prompts_file, tmp_path / "resumed", **extra)
    killed_after_first_checkpoint(lambda: run(cfg), monkeypatch)
    result = run_online(load(cfg), resume=True,
                        generator_factory=lambda m, t: ScriptedGenerator(t, CANDIDATES, score_model=m))  # fmt: skip
    resumed = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert [m["critic_warmup"] for m in resumed] == [1, 1, 1, 0, 0]
    assert [m["beta"] for m in straight[:4]] == [0.02] * 4 and straight[4]["beta"] != 0.02
    keys = ("loss", "reward", "lr", "value_loss", "beta", "critic_warmup")
    for a, b in zip(straight[2:], resumed[2:], strict=True):
        assert [a[k] for k in keys] == [b[k] for k in keys]
    assert same(weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model"))
    from transformers import AutoModelForSequenceClassification

    critic = lambda run: AutoModelForSequenceClassification.from_pretrained(tmp_path / run / "critic")  # noqa: E731
    assert same(critic("straight").state_dict(), critic("resumed").state_dict())


def test_warmup_step_reads_the_device_once(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """As tests/test_syncs.py holds PPO: 2 epochs x 2 minibatches per rollout, one read per rollout, warm-up
    steps (the first 2 of 3) included."""
    cfg = ppo_config(tiny_model_dir, prompts_file, tmp_path / "s", max_steps=3, critic_warmup_steps=2)
    with counting_reads() as at_steps:
        run(cfg)
    assert len(at_steps) == 3 * 4
    assert reads_between_steps(at_steps) == ([0, 0, 0, 1] * 3)[:-1]
