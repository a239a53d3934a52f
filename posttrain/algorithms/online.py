"""The online methods: sample from the current policy, score, turn rewards into advantages, optimise.

Each class holds its paper's hyperparameters; the online loop (posttrain/training/online.py) reads them.
Sampling settings live in the config's ``generation:`` section, shared by every online method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from posttrain.algorithms.base import Algorithm
from posttrain.errors import check

if TYPE_CHECKING:
    from posttrain.config import GenerationConfig


@dataclass(frozen=True)
class OnlineAlgorithm(Algorithm):
    """Trains on prompts (with columns for the rewards); ``batch_size`` counts prompts per step."""

    data_kind: ClassVar[str] = "prompts"
    needs_reference: ClassVar[bool] = False  # a KL term loads its own reference when beta > 0 (uses_reference)
    default_learning_rate: ClassVar[float] = 1e-6
    num_generations: int = 8
    beta: float = 0.04

    def __post_init__(self) -> None:
        check(self.num_generations >= 2, "num_generations", f"must be >= 2 (a group), got {self.num_generations}")
        check(self.beta >= 0, "beta", f"must be >= 0 (0 loads no reference), got {self.beta}")

    reference_scores_samples: ClassVar[bool] = True
    """The reference scores the run's own samples (a KL term, loaded when beta > 0): ``reference.kind`` is
    ``copy``, or ``none`` with beta 0; never ``cached``, as the samples do not exist before the run."""

    def uses_reference(self, kind: str) -> bool:
        if self.reference_scores_samples:
            return self.beta > 0  # (kind is copy: reference_refusal)
        return super().uses_reference(kind)

    def reference_refusal(self, kind: str) -> str | None:
        if not self.reference_scores_samples:
            return super().reference_refusal(kind)
        if kind == "cached":
            return (
                f"cached is for offline data; {self.name} scores the reference on its own samples, which do not "
                "exist before the run (use copy)"
            )
        if kind == "none" and self.beta > 0:
            return f"none, but beta is {self.beta}: the KL term needs a reference (use copy, or set beta: 0)"
        return None

    def extra_rewards(self, generation: GenerationConfig) -> list[dict[str, Any]]:
        """Reward terms the method adds to the configured ones (DAPO: its soft overlong punishment)."""
        return []

    def masks_truncated(self, generation: GenerationConfig) -> bool:
        """Whether completions cut by ``max_new_tokens`` get no loss: ``generation.mask_truncated``, or the
        method's default when that is null (DAPO filters them, the others keep them)."""
        return bool(generation.mask_truncated)


@dataclass(frozen=True)
class GRPO(OnlineAlgorithm):
    """GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3) and its fixes, chosen by hyperparameters.

    Defaults follow DeepSeekMath: G = ``num_generations`` 8 samples per prompt (they used 64), advantages
    (r - mean) / std within the group, clip 0.2, k3 KL to the reference with beta 0.04, per-sequence token
    mean (``loss_aggregation: grpo``). Dr. GRPO (Liu et al. 2025): ``scale_rewards: none`` and
    ``loss_aggregation: dr_grpo``. DAPO (Yu et al. 2025): ``epsilon_high: 0.28``, ``beta: 0``,
    ``loss_aggregation: dapo``, ``dynamic_sampling: true``. GSPO (Zheng et al. 2025): ``sequence_level_ratio: true``.
    """

    name: ClassVar[str] = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    scale_rewards: Literal["std", "none"] = "std"
    loss_aggregation: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    num_iterations: int = 1
    """mu: optimisation passes over each batch of samples (with mu = 1 the ratio is exactly 1)."""
    sequence_level_ratio: bool = False
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards all tie and refill the batch with fresh prompts."""
    max_resample: int = 3
    """With ``dynamic_sampling``: at most this many extra draws of ``batch_size`` prompts per step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_resample >= 0, "max_resample", f"must be >= 0, got {self.max_resample}")
        check(0 < self.epsilon_low < 1, "epsilon_low", f"must be in (0, 1), got {self.epsilon_low}")
        check(self.epsilon_high > 0, "epsilon_high", f"must be > 0, got {self.epsilon_high}")
        check(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")


@dataclass(frozen=True)
class DrGRPO(GRPO):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783, Eq. 3): GRPO
    without its two biases: no division by the group std (``scale_rewards: none``) and a constant normaliser
    instead of each sequence's length (``loss_aggregation: dr_grpo``: the token sum over max_new_tokens x
    sequences). Every other GRPO key is still accepted and keeps GRPO's default."""

    name: ClassVar[str] = "dr_grpo"
    scale_rewards: Literal["std", "none"] = "none"
    loss_aggregation: Literal["grpo", "dapo", "dr_grpo"] = "dr_grpo"


@dataclass(frozen=True)
class DAPO(GRPO):
    """DAPO (Yu et al. 2025, arXiv:2503.14476, Eq. 8 and Section 3): GRPO with clip-higher
    (``epsilon_high: 0.28``), no KL term (``beta: 0``), the token-level loss (``loss_aggregation: dapo``),
    dynamic sampling (groups whose rewards all tie are dropped and the batch refilled), overlong filtering
    (``generation.mask_truncated`` defaults to true) and the soft overlong punishment of Eq. 13 added to the
    rewards, with a buffer of ``overlong_buffer`` tokens before ``max_new_tokens`` (the paper: 4096 of 20480,
    the same fifth; 0 turns the term off)."""

    name: ClassVar[str] = "dapo"
    epsilon_high: float = 0.28
    beta: float = 0.0
    loss_aggregation: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    dynamic_sampling: bool = True
    overlong_buffer: int | None = None
    """L_cache of Eq. 13 in tokens; null = max_new_tokens // 5; 0 = no soft overlong punishment."""
    overlong_penalty: float = 1.0
    """Weight of the soft overlong punishment (it lies in [-1, 0] before the weight)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        buf = self.overlong_buffer
        check(buf is None or buf >= 0, "overlong_buffer", f"must be >= 0 or null, got {buf}")
        check(self.overlong_penalty >= 0, "overlong_penalty", f"must be >= 0, got {self.overlong_penalty}")

    def extra_rewards(self, generation: GenerationConfig) -> list[dict[str, Any]]:
        cache = generation.max_new_tokens // 5 if self.overlong_buffer is None else self.overlong_buffer
        cache = min(cache, generation.max_new_tokens)
        if cache == 0 or self.overlong_penalty == 0:
            return []
        spec = {"name": "overlong", "label": "soft_overlong", "max_length": generation.max_new_tokens, "cache": cache}
        return [{**spec, "weight": self.overlong_penalty}]

    def masks_truncated(self, generation: GenerationConfig) -> bool:
        return True if generation.mask_truncated is None else generation.mask_truncated


@dataclass(frozen=True)
class RLOO(OnlineAlgorithm):
    """RLOO (Ahmadian et al. 2024): k samples per prompt, advantage r_i minus the mean of the other k-1,
    REINFORCE on the summed sequence log-prob; the KL to the reference (k1, summed over the sequence, times
    ``beta``) is folded into the reward."""

    name: ClassVar[str] = "rloo"
    num_generations: int = 4
    beta: float = 0.05


@dataclass(frozen=True)
class PPO(OnlineAlgorithm):
    """PPO for RLHF, the third stage of InstructGPT (Ouyang et al. 2022, Eq. 2; Ziegler et al. 2019): a
    critic gives per-token values; the reward of a completion is its score on the last token minus
    ``beta`` times the per-token k1 KL to the reference on every token; GAE (``gamma``, ``lam``) gives
    advantages (whitened over the batch) and returns = advantages + old values; ``ppo_epochs`` passes of
    ``num_mini_batches`` optimizer steps each over the rollout, with the clipped policy loss (``epsilon``,
    Schulman et al. 2017, Eq. 7) and the clipped value loss (``value_clip``, weighted ``vf_coef``).
    Defaults follow TRL's PPO trainer and "The N+ Implementation Details of RLHF with PPO" (Huang et al.
    2024): one sample per prompt, beta 0.05, 4 epochs, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1,
    lam 0.95."""

    name: ClassVar[str] = "ppo"
    num_generations: int = 1
    beta: float = 0.05
    adaptive_kl: bool = False
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019, Sec. 2.2) instead of keeping it fixed."""
    kl_target: float = 6.0
    """With ``adaptive_kl``: the policy-to-reference KL (nats per completion) to hold."""
    kl_gain: float = 0.1
    """With ``adaptive_kl``: K_beta, how fast beta moves (at most +-20% x K_beta per step)."""
    gamma: float = 1.0
    lam: float = 0.95
    epsilon: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    num_mini_batches: int = 1
    """Optimizer steps per epoch; the rollout's rows are shuffled and split into this many minibatches."""
    whiten_advantages: bool = True
    target_kl: float | None = None
    """Stop a rollout's epochs early once the mean approximate KL(old || new) per token exceeds it."""
    critic_model: str | None = None
    """The critic's starting weights: a reward model (InstructGPT) or any causal LM, given a new value
    head; null = the ``reward_model`` reward's path when there is one, else the policy's starting model."""
    share_trunk: bool = False
    """A value head on the policy's own trunk instead of a separate critic model (one model less)."""
    critic_learning_rate: float | None = None
    """The critic's learning rate; null = the policy's."""
    critic_warmup_steps: int = 0
    """The first this many steps (rollouts) train the critic alone: sampled, scored and given GAE targets as
    usual, with the value loss only; the policy's weights, its AdamW state and ``beta`` do not move (its lr
    schedule does count them). Counted in ``max_steps``: keep it smaller (not checked here, where
    ``max_steps`` is not known; a run of warm-up alone never trains the policy)."""

    def __post_init__(self) -> None:
        check(self.num_generations >= 1, "num_generations", f"must be >= 1, got {self.num_generations}")
        check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        check(self.kl_target > 0, "kl_target", f"must be > 0, got {self.kl_target}")
        check(self.kl_gain >= 0, "kl_gain", f"must be >= 0, got {self.kl_gain}")
        check(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        check(0 < self.epsilon < 1, "epsilon", f"must be in (0, 1), got {self.epsilon}")
        check(self.value_clip > 0, "value_clip", f"must be > 0, got {self.value_clip}")
        check(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")
        check(self.ppo_epochs >= 1, "ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        check(self.num_mini_batches >= 1, "num_mini_batches", f"must be >= 1, got {self.num_mini_batches}")
        tk = self.target_kl
        check(tk is None or tk > 0, "target_kl", f"must be > 0 or null, got {tk}")
        clr = self.critic_learning_rate
        check(clr is None or clr > 0, "critic_learning_rate", f"must be > 0 or null, got {clr}")
        cws = self.critic_warmup_steps
        check(cws >= 0, "critic_warmup_steps", f"must be >= 0, got {cws}")
        check(
            not (self.share_trunk and self.critic_model),
            "critic_model",
            "must be null with share_trunk: true (the value head sits on the policy)",
        )


@dataclass(frozen=True)
class IterativeDPO(OnlineAlgorithm):
    """Iterative DPO, the seeds' path@N: each round samples ``num_generations`` answers per prompt from the
    current policy, scores them, pairs best against worst (``pairs_per_prompt`` = k: the k best against the k
    worst; dropping pairs within ``tie_threshold``), saves
    the pairs as a data set and trains ``loss`` (any DPO-family method) on them; ``rounds`` rounds. The
    reference is the initial model (``reference_update: initial``) or the last round's (``last``). One
    optimizer step per round (``steps_per_round: 1``) is the per-step online DPO of Guo et al. 2024; DPO with
    ``rpo_alpha: 1`` (an NLL term on each round's chosen answers) is the iterative RPO of Pang et al. 2024;
    ``loss: distill`` regresses each pair's implicit reward margin onto its reward margin (the pairs' ``margin``
    column: the chosen's score minus the rejected's), with ``reference_update: last`` REBEL (Gao et al. 2024)."""

    name: ClassVar[str] = "iterative_dpo"
    default_learning_rate: ClassVar[float] = 5e-7
    reference_scores_samples: ClassVar[bool] = False  # each round's DPO run: copy or cached, as offline
    num_generations: int = 4
    beta: float = 0.1
    rounds: int = 2
    tie_threshold: float = 0.0
    loss: Literal["dpo", "ipo", "cdpo", "robust_dpo", "hinge", "simpo", "orpo", "distill"] = "dpo"
    reference_update: Literal["initial", "last"] = "initial"
    steps_per_round: int | None = None
    """Optimizer steps per round; None = one pass (``epochs``) over the round's pairs."""
    prompts_per_round: int | None = None
    """Prompts sampled each round, drawn afresh per round from the training prompts; None = all of them."""
    pairs_per_prompt: int = 1
    """Pairs per prompt: the i-th best answer against the i-th worst, i = 1..k (k <= num_generations // 2)."""
    rpo_alpha: float = 0.0
    """``loss: dpo`` only: the weight of the NLL-on-chosen term each round's DPO run adds (``dpo``'s key)."""

    def __post_init__(self) -> None:
        check(self.num_generations >= 2, "num_generations", f"must be >= 2, got {self.num_generations}")
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.tie_threshold >= 0, "tie_threshold", f"must be >= 0, got {self.tie_threshold}")
        spr = self.steps_per_round
        check(spr is None or spr >= 1, "steps_per_round", f"must be >= 1 or null, got {spr}")
        ppr = self.prompts_per_round
        check(ppr is None or ppr >= 1, "prompts_per_round", f"must be >= 1 or null, got {ppr}")
        k, half = self.pairs_per_prompt, self.num_generations // 2
        check(1 <= k <= half, "pairs_per_prompt", f"must be between 1 and num_generations // 2 = {half}, got {k}")
        check(self.rpo_alpha >= 0, "rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")
        check(self.rpo_alpha == 0 or self.loss == "dpo", "rpo_alpha",
              f"the NLL term belongs to the dpo loss (RPO): needs loss: dpo, got loss: {self.loss}")  # fmt: skip
