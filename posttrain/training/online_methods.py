"""The online methods behind one seam, as :class:`~posttrain.training.task.OfflineTask` is for the offline ones.

:func:`posttrain.training.online.run_online` is the loop alone: sample, score, targets, passes, steps,
figures. A method here says what the loop must compute before the passes (old log-probs, a critic), how many
passes it makes over a rollout and how many optimizer steps per pass, turns a scored rollout into its targets,
gives the loss of one micro-batch with its figures (0-dim or per-row tensors, left on the device until the
step's one read), and adds its own figures to the step's. Adding a method: a class here and its entry in
:data:`METHODS`; neither loop changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from posttrain import distributed
from posttrain.algorithms.online import GRPO, PPO, RLOO, OnlineAlgorithm
from posttrain.config import TrainConfig
from posttrain.host import to_device
from posttrain.losses import aggregate
from posttrain.losses.policy import aggregate_policy_loss, kl_k1, kl_k3, ppo_clip, rloo_loss
from posttrain.model.logps import TokenLogps
from posttrain.model.value import SharedCritic, critic_source, load_critic
from posttrain.rollout.advantages import adaptive_kl_coef, group_advantages, rloo_advantages
from posttrain.training.ppo import PPOTargets, critic_warmup_loss, ppo_figures, ppo_loss, ppo_targets
from posttrain.training.rollouts import Samples

Counts = dict[str, int]
"""``tokens`` and ``sequences`` of the whole minibatch (every process's share), counted on the host."""


@dataclass
class Targets:
    """What the passes over one rollout train towards, computed once before them."""

    advantages: Tensor  # (N,) per completion or (N, T) per token: also what completions.jsonl logs
    old: Tensor | None  # (N, T) log-probs of the policy that sampled (None: the ratio is exactly 1)
    ref: Tensor | None  # (N, T) reference log-probs (None: no KL term)
    figures: dict[str, Tensor] = field(default_factory=dict)  # rollout figures, read with the step's
    ppo: PPOTargets | None = None


class OnlineMethod:
    """The defaults: one pass over each rollout, one optimizer step per pass, no critic."""

    def __init__(self, alg: OnlineAlgorithm, config: TrainConfig) -> None:
        self.alg = alg
        self.config = config
        self.kl_coef = alg.beta  # PPO's adaptive controller moves it (kept in checkpoints); the config keeps beta

    passes = 1
    """Passes over each rollout (GRPO's mu, PPO's epochs)."""
    minibatches = 1
    """Optimizer steps per pass, each on its share of the shuffled rollout (PPO's minibatches)."""
    dynamic_sampling = False
    """Refill the batch with fresh prompts in place of groups whose rewards all tie (DAPO)."""
    max_resample = 0

    def begin_step(self, step: int) -> None:
        """Called as step ``step`` (0-based; a resumed run starts at its checkpoint's) begins, before sampling."""

    def needs_old(self, reference: bool) -> bool:
        """Whether the old policy's log-probs are scored before the passes (``reference``: a reference is)."""
        return self.passes > 1

    def build_critic(
        self, policy: nn.Module, tokenizer: Any, device: torch.device
    ) -> tuple[nn.Module | None, Callable[[], nn.Module] | None]:
        """``(critic, how to build it again empty for saving)``; ``(None, None)``: no critic."""
        return None, None

    def critic_learning_rate(self) -> float:
        return self.config.lr

    def targets(
        self, s: Samples, old: Tensor | None, ref: Tensor | None, old_values: Tensor | None, tokens: int
    ) -> Targets:
        """The rollout's targets (``tokens``: its completion tokens, counted on the host)."""
        raise NotImplementedError

    def loss(
        self, cur: TokenLogps, rows: Tensor, t: Targets, counts: Counts, values: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of the micro-batch ``rows`` (its share of the minibatch's) and its figures."""
        raise NotImplementedError

    def keep_passing(self, approx_kl: Tensor, pass_tokens: Tensor) -> bool:
        """After a pass: whether to make the next one over this rollout (no device read by default)."""
        return True

    def add_figures(self, figures: dict[str, Any], sums: dict[str, float], tokens: int, passes_done: int) -> None:
        """The method's own figures of a step, added to ``figures`` after they are read."""


class GRPOMethod(OnlineMethod):
    """GRPO and its presets: group-normalised advantages, the clipped surrogate, k3 KL to the reference."""

    alg: GRPO

    @property
    def passes(self) -> int:  # type: ignore[override]
        return self.alg.num_iterations

    @property
    def dynamic_sampling(self) -> bool:  # type: ignore[override]
        return self.alg.dynamic_sampling

    @property
    def max_resample(self) -> int:  # type: ignore[override]
        return self.alg.max_resample

    def targets(
        self, s: Samples, old: Tensor | None, ref: Tensor | None, old_values: Tensor | None, tokens: int
    ) -> Targets:
        return Targets(group_advantages(s.rewards, self.alg.num_generations, scale=self.alg.scale_rewards), old, ref)

    def loss(
        self, cur: TokenLogps, rows: Tensor, t: Targets, counts: Counts, values: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        old = t.old[rows] if t.old is not None else cur.logps.detach()
        ref = t.ref[rows] if t.ref is not None else None
        max_new = self.config.generation.max_new_tokens
        return grpo_loss(self.alg, cur, old, ref, t.advantages[rows].to(cur.logps.device), counts, max_new)


class RLOOMethod(OnlineMethod):
    """RLOO: leave-one-out baselines on the rewards, the k1 sequence KL folded into them."""

    alg: RLOO

    def needs_old(self, reference: bool) -> bool:
        return reference  # the KL penalty is scored on the sampling policy's log-probs

    def targets(
        self, s: Samples, old: Tensor | None, ref: Tensor | None, old_values: Tensor | None, tokens: int
    ) -> Targets:
        kl = torch.zeros_like(s.rewards)
        if ref is not None and old is not None:  # the KL penalty folded into the reward (k1, summed)
            kl = kl_k1(policy_logps=old, ref_logps=ref).sum(-1).double()  # (on the device)
        advantages = rloo_advantages(s.rewards.to(kl.device) - self.alg.beta * kl, self.alg.num_generations)
        figures = {"kl_ref": kl.mean()} if ref is not None else {}  # KL to the reference per completion
        return Targets(advantages, old, ref, figures)

    def loss(
        self, cur: TokenLogps, rows: Tensor, t: Targets, counts: Counts, values: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return rloo_loss_of(cur, t.advantages[rows].to(cur.sums.device), counts)


class PPOMethod(OnlineMethod):
    """PPO: a critic, per-token rewards with the KL penalty, GAE, epochs over shuffled minibatches.

    The first ``critic_warmup_steps`` steps train the critic alone (:meth:`loss`): the policy gets no
    gradient, so AdamW skips its parameters (no update, no weight decay, no moments: its first real step is
    AdamW's step 1), and the adaptive KL controller holds ``beta``. The policy's lr schedule still advances
    (run_online steps every schedule), so ``max_steps`` and ``warmup_ratio`` count the warm-up steps.
    """

    alg: PPO

    def __init__(self, alg: PPO, config: TrainConfig) -> None:
        super().__init__(alg, config)
        self.critic: nn.Module | None = None  # (kept for a shared head's warm-up values)
        self.warming_up = alg.critic_warmup_steps > 0

    def begin_step(self, step: int) -> None:
        # From the loop's step counter, which a resumed run restores: a resume mid-warm-up stays in it.
        self.warming_up = step < self.alg.critic_warmup_steps

    @property
    def passes(self) -> int:  # type: ignore[override]
        return self.alg.ppo_epochs

    @property
    def minibatches(self) -> int:  # type: ignore[override]
        return self.alg.num_mini_batches

    def needs_old(self, reference: bool) -> bool:
        return True

    def build_critic(
        self, policy: nn.Module, tokenizer: Any, device: torch.device
    ) -> tuple[nn.Module | None, Callable[[], nn.Module] | None]:
        """A value head on the policy's trunk, or a model of its own."""
        if self.alg.share_trunk:
            hidden = int(policy.config.get_text_config().hidden_size)  # type: ignore[union-attr,operator]
            self.critic = SharedCritic(hidden).to(device)
            return self.critic, None
        source = critic_source(self.alg.critic_model, self.config.rewards, self.config.model)
        critic = load_critic(source, tokenizer, gradient_checkpointing=self.config.gradient_checkpointing)
        self.critic = critic.to(device)
        return self.critic, lambda: load_critic(source, tokenizer)  # (rebuilt for saving under fsdp2)

    def critic_learning_rate(self) -> float:
        return self.alg.critic_learning_rate or self.config.lr

    def targets(
        self, s: Samples, old: Tensor | None, ref: Tensor | None, old_values: Tensor | None, tokens: int
    ) -> Targets:
        assert old is not None and old_values is not None
        device = old.device
        mask, rewards = to_device(s.loss_mask, device), to_device(s.rewards, device)
        ppo = ppo_targets(self.alg, self.kl_coef, rewards, old, ref, old_values, mask, tokens=tokens)
        return Targets(ppo.advantages, old, ref, ppo_figures(ppo, mask), ppo)

    def loss(
        self, cur: TokenLogps, rows: Tensor, t: Targets, counts: Counts, values: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        assert t.ppo is not None and t.old is not None and values is not None
        rows_here = rows.to(cur.logps.device)
        if self.warming_up:  # the critic alone: no policy term, so no policy gradient
            if isinstance(self.critic, SharedCritic):  # the head on the trunk's detached states: the trunk stays
                assert cur.hidden is not None
                values = self.critic(cur.hidden.detach(), cur.mask)
            return critic_warmup_loss(self.alg, cur.mask, values, t.ppo, rows_here, counts["tokens"])
        return ppo_loss(self.alg, cur, t.old[rows], values, t.ppo, rows_here, counts["tokens"])

    def keep_passing(self, approx_kl: Tensor, pass_tokens: Tensor) -> bool:
        if self.alg.target_kl is None or self.warming_up:  # (warming up: the policy does not move)
            return True
        moved, moved_tokens = distributed.sum_floats([float(approx_kl), float(pass_tokens)])  # (this option only)
        return moved / max(1, moved_tokens) <= self.alg.target_kl  # else far enough from the sampling policy

    def add_figures(self, figures: dict[str, Any], sums: dict[str, float], tokens: int, passes_done: int) -> None:
        figures["beta"] = self.kl_coef
        figures.update(value_loss=sums["value_loss"], epochs=passes_done,
                       value_clip_frac=sums["value_clipped_tokens"] / tokens)  # fmt: skip
        if self.alg.critic_warmup_steps:
            figures["critic_warmup"] = int(self.warming_up)
        if not self.warming_up:
            figures["policy_loss"] = sums["policy_loss"]
        if self.alg.adaptive_kl and not self.warming_up:  # (warming up: the KL cannot move, beta holds)
            alg = self.alg
            self.kl_coef = adaptive_kl_coef(self.kl_coef, float(figures["kl_ref"]), alg.kl_target, alg.kl_gain)


def grpo_loss(
    alg: GRPO,
    cur: TokenLogps,
    old: Tensor,
    ref: Tensor | None,
    advantages: Tensor,
    counts: Counts,
    max_new_tokens: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (+ beta k3 KL to the reference) per token, reduced as ``loss_aggregation`` says."""
    out = ppo_clip(
        policy_logps=cur.logps, old_logps=old, advantages=advantages.to(cur.logps.dtype), loss_mask=cur.mask,
        eps_low=alg.epsilon_low, eps_high=alg.epsilon_high, sequence_level=alg.sequence_level_ratio,
    )  # fmt: skip
    per_token = out.loss
    metrics = dict(out.metrics)
    if ref is not None and alg.beta > 0:
        kl = kl_k3(policy_logps=cur.logps, ref_logps=ref) * cur.mask
        per_token = per_token + alg.beta * kl
        metrics["kl_sum"] = kl.detach().sum(-1)
    loss = aggregate_policy_loss(
        per_token, cur.mask, mode=alg.loss_aggregation, global_tokens=counts["tokens"],
        global_sequences=counts["sequences"], max_completion_length=max_new_tokens,
    )  # fmt: skip
    return loss, metrics


def rloo_loss_of(cur: TokenLogps, advantages: Tensor, counts: Counts) -> tuple[Tensor, dict[str, Tensor]]:
    out = rloo_loss(policy_seq_logps=cur.sums, advantages=advantages.to(cur.sums.dtype))
    return aggregate(out.loss, global_count=counts["sequences"]), {}


METHODS: dict[type[OnlineAlgorithm], type[OnlineMethod]] = {GRPO: GRPOMethod, RLOO: RLOOMethod, PPO: PPOMethod}
"""The method class of each online algorithm class (a preset, e.g. DAPO, takes its base's: GRPO's)."""


def online_method(config: TrainConfig) -> OnlineMethod:
    alg = config.algorithm
    for cls in type(alg).__mro__:
        if cls in METHODS:
            assert isinstance(alg, OnlineAlgorithm)
            return METHODS[cls](alg, config)
    raise ValueError(f"method {alg.name!r} has no online method class (posttrain.training.online_methods)")
