"""PPO on the online loop: the rollout's targets by hand, values aligned with log-probs, one epoch without
an update has ratio 1, the reward rises with a bounded KL on a tiny model, and the critic reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support import write_word_prompts
from transformers import AutoModelForSequenceClassification

from posttrain.config import ConfigError, load
from posttrain.model.value import SeparateCritic, SharedCritic, load_critic
from posttrain.rollout.advantages import adaptive_kl_coef, gae
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online
from posttrain.training.ppo import ppo_targets

CANDIDATES = ["yes", "no", "maybe"]


def ppo_config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "method": "ppo", "model": str(model), "output_dir": str(out),
        "data": {"train": str(data), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 2, "batch_size": 4, "max_steps": 15, "learning_rate": 3e-3,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "beta": 0.02, "ppo_epochs": 2,
        "num_mini_batches": 2,
    }  # fmt: skip
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_word_prompts(path, 16)
    return path


def run(config: dict[str, Any]) -> list[dict[str, Any]]:
    result = run_online(load(config), generator_factory=lambda m, t: ScriptedGenerator(t, CANDIDATES, score_model=m))
    return [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]


def test_targets_by_hand() -> None:
    """One sequence of 2 completion tokens (positions 1, 2), score 1, beta 0.5, gamma 1, lam 0.5.
    k1 = old - ref = (0.2, -0.4); rewards r = (-0.1, 0.2 + 1) = (-0.1, 1.2); values V = (0.5, 0.3).
    delta_2 = 1.2 - 0.3 = 0.9; delta_1 = -0.1 + 0.3 - 0.5 = -0.3; A_2 = 0.9; A_1 = -0.3 + 0.5 * 0.9 = 0.15;
    returns = A + V = (0.65, 1.2). Non-score reward = -0.5 * (0.2 - 0.4) = 0.1."""
    from posttrain.algorithms.online import PPO

    alg = PPO(lam=0.5, whiten_advantages=False)
    mask = torch.tensor([[False, True, True]])
    old = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[0.0, -1.2, -1.6]])
    values = torch.tensor([[0.0, 0.5, 0.3]])
    t = ppo_targets(alg, 0.5, torch.tensor([1.0]), old, ref, values, mask)
    torch.testing.assert_close(t.advantages, torch.tensor([[0.0, 0.15, 0.9]], dtype=torch.float64))
    torch.testing.assert_close(t.returns, torch.tensor([[0.0, 0.65, 1.2]], dtype=torch.float64))
    torch.testing.assert_close(t.non_score_reward, torch.tensor([0.1], dtype=torch.float64))
    again, _ = gae(torch.tensor([[0.0, -0.1, 1.2]]), values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(t.advantages.float(), again)


def test_adaptive_kl_moves_beta_towards_the_target() -> None:
    """e = clip(KL / target - 1, -0.2, 0.2): KL 3x the target raises beta by 0.1 x 0.2 = 2%; KL at half
    the target lowers it by 0.1 x 0.2 as well (clipped from 0.5); on target it stays."""
    assert adaptive_kl_coef(0.1, 18.0, 6.0) == pytest.approx(0.102)
    assert adaptive_kl_coef(0.1, 3.0, 6.0) == pytest.approx(0.098)
    assert adaptive_kl_coef(0.1, 6.0, 6.0) == 0.1


def test_separate_and_shared_values_line_up_with_logps(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """values[:, t] is the head on the hidden state at t - 1 (the state that produced token t), 0 off the
    mask; a critic loaded from a causal LM keeps its trunk."""
    critic = load_critic(str(tiny_model_dir), tiny_tokenizer, gradient_checkpointing=False)
    assert isinstance(critic, SeparateCritic)
    torch.nn.init.normal_(critic.model.score.weight)  # a new head starts at zero (tested below): give it values
    ids = torch.tensor([[5, 6, 7, 8]])
    att = torch.ones_like(ids)
    mask = torch.tensor([[False, False, True, True]])
    values = critic(ids, att, mask)
    trunk = critic.model.model(input_ids=ids, attention_mask=att).last_hidden_state
    expected = critic.model.score(trunk).squeeze(-1)
    torch.testing.assert_close(values[0, 2:], expected[0, 1:3])
    assert values[0, :2].tolist() == [0.0, 0.0]
    shared = SharedCritic(trunk.shape[-1])
    assert shared(trunk, mask).abs().sum() == 0.0  # zero-initialised head: no random baseline


def test_a_new_critic_head_starts_at_zero_and_a_saved_one_is_kept(
    tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    """From a causal LM the critic's score head is new and zero (values 0, explained variance 0 at the
    first rollout, not transformers' random head's noise); a saved critic or reward model keeps its head."""
    ids, att = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    mask = torch.tensor([[False, True, True, True]])
    critic = load_critic(str(tiny_model_dir), tiny_tokenizer)
    assert critic(ids, att, mask).abs().sum() == 0.0 and critic.new_head
    assert critic.model.score.weight.requires_grad
    torch.nn.init.normal_(critic.model.score.weight)
    critic.save(tmp_path / "critic", tiny_tokenizer)
    again = load_critic(str(tmp_path / "critic"), tiny_tokenizer)
    torch.testing.assert_close(again.model.score.weight, critic.model.score.weight)
    assert not again.new_head
    torch.testing.assert_close(again(ids, att, mask), critic(ids, att, mask))


def test_one_epoch_without_an_update_has_ratio_one(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """One epoch, one minibatch: the only forward with grad sees the rollout's own weights."""
    cfg = ppo_config(tiny_model_dir, prompts_file, tmp_path / "one", max_steps=2, ppo_epochs=1, num_mini_batches=1)
    for m in run(cfg):
        assert m["clip_low"] == 0.0 and m["clip_high"] == 0.0 and m["approx_kl_old"] == pytest.approx(0.0, abs=1e-7)
        assert m["epochs"] == 1


def test_reward_rises_kl_bounded_and_critic_reloads(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    steps = run(ppo_config(tiny_model_dir, prompts_file, tmp_path / "ppo"))
    rewards = [m["reward"] for m in steps]
    assert rewards[0] < 0.6 and sum(rewards[-4:]) / 4 > rewards[0] + 0.3, rewards
    assert all(abs(m["kl_ref"]) < 5.0 for m in steps)  # nats per completion of 2 tokens
    for key in ("value_loss", "explained_variance", "non_score_reward", "clip_low", "entropy", "value_clip_frac"):
        assert key in steps[-1], key
    assert any(m["clip_high"] > 0 or m["clip_low"] > 0 for m in steps)  # later epochs do clip
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ppo" / "critic")
    assert critic.config.num_labels == 1


def test_shared_trunk_and_adaptive_kl_run(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    cfg = ppo_config(tiny_model_dir, prompts_file, tmp_path / "sh", max_steps=3, share_trunk=True, adaptive_kl=True,
                     kl_target=0.01)  # fmt: skip
    steps = run(cfg)
    betas = [m["beta"] for m in steps]
    assert betas[0] == 0.02 and all(b > 0 for b in betas)
    assert (tmp_path / "sh" / "critic" / "value_head.safetensors").exists()


def test_shared_trunk_with_gradient_checkpointing(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    """The trunk's rows are scored padded (its hidden states are the value head's input), so their
    checkpointed layers recompute without span attention while the reference is scored with shared prompts."""
    cfg = ppo_config(tiny_model_dir, prompts_file, tmp_path / "gc", max_steps=2, share_trunk=True,
                     gradient_checkpointing=True)  # fmt: skip
    steps = run(cfg)
    assert len(steps) == 2 and all(m["loss"] == m["loss"] for m in steps)  # ran, no NaN


def test_early_stop_on_the_old_to_new_kl(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    steps = run(ppo_config(tiny_model_dir, prompts_file, tmp_path / "es", max_steps=3, ppo_epochs=6, target_kl=1e-6,
                           learning_rate=1e-2))  # fmt: skip
    assert any(m["epochs"] < 6 for m in steps)


def test_ppo_config_checks(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"critic_model: must be null with share_trunk"):
        load(ppo_config(tiny_model_dir, prompts_file, tmp_path / "x", share_trunk=True, critic_model="m"))
    with pytest.raises(ConfigError, match=r"lam: must be in \[0, 1\]"):
        load(ppo_config(tiny_model_dir, prompts_file, tmp_path / "x", lam=1.5))
