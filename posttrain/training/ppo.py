"""What PPO adds to the online loop: a critic, per-token rewards with the KL penalty, GAE, and the
policy + value loss of one micro-batch. The loop itself is :func:`posttrain.training.online.run_online`.

Memory: PPO holds four models (policy, reference, reward model, critic) where GRPO holds two; docs/ppo.md
lists what each costs and the lean options (LoRA policy with the adapters-off base as the reference, a
value head on the policy's trunk, reference log-probs computed at rollout time and dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posttrain.algorithms.online import PPO
from posttrain.losses.policy import aggregate_policy_loss, kl_k1, ppo_clip, value_loss
from posttrain.model.logps import TokenLogps
from posttrain.model.value import SeparateCritic, SharedCritic
from posttrain.rollout.advantages import explained_variance, gae, ppo_token_rewards, whiten


@dataclass(frozen=True)
class PPOTargets:
    """Per-token constants of one rollout, (N, T) each: advantages, returns and the critic's old values."""

    advantages: Tensor
    returns: Tensor
    old_values: Tensor
    kl: Tensor  # k1 per token, policy at rollout time vs reference
    non_score_reward: Tensor  # (N,) -beta * summed KL


def critic_values(critic: nn.Module, s_ids: Tensor, s_att: Tensor, s_mask: Tensor, cur: TokenLogps) -> Tensor:
    """(N, T) values of a micro-batch: a separate critic runs its own forward, a shared one reads ``cur``'s
    hidden states (the policy's forward, which must have been asked ``with_hidden``)."""
    if isinstance(critic, SharedCritic):
        assert cur.hidden is not None, "a shared critic needs the policy's hidden states"
        return critic(cur.hidden, s_mask)
    assert isinstance(critic, SeparateCritic)
    return critic(s_ids, s_att, s_mask)


def ppo_targets(
    alg: PPO,
    beta: float,
    scores: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor | None,
    old_values: Tensor,
    mask: Tensor,
    tokens: int | None = None,
) -> PPOTargets:
    """Steps of the rollout, before any update: rewards r_t = score on the last token - beta * k1_t, GAE
    (gamma, lam) on the old values, returns = advantages + old values, advantages whitened over the batch.
    ``tokens``: the number of completion tokens, counted on the host (else read from ``mask``)."""
    mask = mask.to(torch.bool)
    kl = kl_k1(policy_logps=old_logps, ref_logps=ref_logps) if ref_logps is not None else torch.zeros_like(old_logps)
    kl = torch.where(mask, kl, 0.0).double()
    rewards = ppo_token_rewards(scores.double(), kl, mask, beta)
    advantages, returns = gae(rewards, old_values.double(), mask, gamma=alg.gamma, lam=alg.lam)
    if alg.whiten_advantages and (int(mask.sum()) if tokens is None else tokens) >= 2:
        advantages = whiten(advantages, mask)
    return PPOTargets(advantages, returns, old_values.double(), kl, -beta * kl.sum(-1))


def ppo_loss(
    alg: PPO, cur: TokenLogps, old: Tensor, values: Tensor, t: PPOTargets, rows: Tensor, tokens: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy loss + ``vf_coef`` x clipped value loss of a micro-batch, each a token mean over the
    minibatch (``tokens`` of it: the micro-batches' shares sum to the minibatch's loss)."""
    dtype = cur.logps.dtype
    adv = t.advantages[rows].to(cur.logps.device, dtype)
    out = ppo_clip(policy_logps=cur.logps, old_logps=old, advantages=adv, loss_mask=cur.mask,
                   eps_low=alg.epsilon, eps_high=alg.epsilon)  # fmt: skip
    value, value_metrics = ppo_value_loss(cur.mask, values, t, rows, tokens, alg.value_clip)
    policy = aggregate_policy_loss(out.loss, cur.mask, mode="dapo", global_tokens=tokens)
    metrics = {**out.metrics, **value_metrics, "policy_loss": policy.detach().reshape(1)}
    return policy + alg.vf_coef * value.to(policy.dtype), metrics


def critic_warmup_loss(
    alg: PPO, mask: Tensor, values: Tensor, t: PPOTargets, rows: Tensor, tokens: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """A critic warm-up step's loss: ``vf_coef`` x the clipped value loss alone, so the critic gets the very
    gradient a PPO step gives it and the policy none (no policy term, no ``policy_loss`` figure)."""
    value, metrics = ppo_value_loss(mask, values, t, rows, tokens, alg.value_clip)
    return alg.vf_coef * value, metrics


def ppo_value_loss(
    mask: Tensor, values: Tensor, t: PPOTargets, rows: Tensor, tokens: int, clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped value loss of a micro-batch towards the rollout's returns, a token mean over the minibatch."""
    vout = value_loss(values=values, old_values=t.old_values[rows].to(values.device, values.dtype),
                      returns=t.returns[rows].to(values.device, values.dtype), loss_mask=mask,
                      clip=clip)  # fmt: skip
    value = aggregate_policy_loss(vout.loss, mask, mode="dapo", global_tokens=tokens)
    metrics = {"value_clipped_tokens": vout.metrics["value_clipped_tokens"], "value_loss": value.detach().reshape(1)}
    return value, metrics


def ppo_figures(t: PPOTargets, mask: Tensor) -> dict[str, Tensor]:
    """Rollout-level PPO metrics, 0-dim tensors left on the device (read with the step's figures): KL to the
    reference, the non-score reward, the critic's explained variance, its mean value on completion tokens."""
    valid = mask.bool()
    return {
        "kl_ref": t.kl.sum(-1).mean(),
        "non_score_reward": t.non_score_reward.mean(),
        "explained_variance": explained_variance(t.old_values, t.returns, mask),
        "value_mean": torch.where(valid, t.old_values, 0.0).sum() / valid.sum().clamp(min=1),
    }
