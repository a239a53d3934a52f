"""Which figures the report draws, and which way is better.

Every chart is a :class:`Panel` of figures named as metrics.jsonl names them; a panel is drawn when a run of
its section logged one of its figures, so each method gets its own charts without a list per method: the
DPO family's margins and reward accuracy, KTO's rewards and KL, the online methods' rewards, KL, clip
fractions, lengths and entropy, PPO's value loss and explained variance.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.report.runs import Run


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "eval")


PANELS = (
    Panel("loss", ("loss",)),
    # The DPO family and reward models
    Panel("policy log-prob margin, chosen - rejected (nats)", ("policy_margin",)),
    Panel("share of pairs where the policy prefers chosen", ("policy_prefers_chosen",)),
    Panel("reward accuracy", ("accuracy",)),
    Panel("rewards of chosen and rejected", ("chosen_rewards", "rejected_rewards")),
    Panel("reward margin, chosen - rejected", ("margins",)),
    Panel("policy log-probs of chosen and rejected", ("policy_chosen_logps", "policy_rejected_logps")),
    # KTO
    Panel("KTO rewards, desirable and undesirable", ("desirable_rewards", "undesirable_rewards")),
    # Online methods
    Panel("reward", ("reward",)),
    Panel("reward standard deviation", ("reward_std",)),
    Panel("KL to the reference", ("kl", "kl_ref")),
    Panel("clip fractions", ("clip_low", "clip_high", "value_clip_frac")),
    Panel("approximate KL to the sampling policy", ("approx_kl_old",)),
    Panel("completion length (tokens)", ("completion_length",)),
    Panel("entropy (nats per token)", ("entropy",)),
    Panel("share of truncated completions", ("truncated",)),
    Panel("share of tied groups", ("tied_groups",)),
    # PPO
    Panel("value loss", ("value_loss",)),
    Panel("explained variance", ("explained_variance",)),
    Panel("policy loss", ("policy_loss",)),
    Panel("KL coefficient", ("beta",)),
    # Iterative DPO: a point per round
    Panel("round: mean reward of the sampled answers", ("reward_mean",), ("round",)),
    Panel("round: preference pairs", ("pairs",), ("round",)),
    # SFT
    Panel("trained tokens per example", ("trained_tokens",)),
    # Every run
    Panel("learning rate", ("lr",)),
    Panel("gradient norm", ("grad_norm",)),
    Panel("peak memory (GiB)", ("peak_rss_gb", "peak_gpu_allocated_gb", "peak_gpu_reserved_gb")),
    Panel("tokens per second", ("tokens_per_s",)),
    Panel("step time (s)", ("step_time_s", "sample_time_s", "score_time_s")),
)

HIGHER_IS_BETTER = frozenset(
    {"policy_margin", "policy_prefers_chosen", "accuracy", "reward", "margins", "desirable_rewards", "rewards"}
)
LOWER_IS_BETTER = frozenset({"loss"})
HEADLINE = ("policy_margin", "policy_prefers_chosen", "accuracy", "reward", "loss")
"""The held-out figures the top of a section leads with, the first three a run has."""


def better(key: str) -> int:
    """+1 where a rise is good, -1 where a fall is, 0 where neither (lengths, KL, log-probs)."""
    if key in HIGHER_IS_BETTER or key.startswith("reward/"):
        return 1
    return -1 if key in LOWER_IS_BETTER else 0


def panels_for(runs: list[Run]) -> list[Panel]:
    """The panels with a figure in some run, the online runs' per-reward terms added to the reward panel."""
    logged = {(split, key) for run in runs for split in ("train", "eval", "round") for key in run.keys(split)}
    out = []
    for panel in PANELS:
        keys = panel.keys
        if panel.keys == ("reward",):  # each reward term of a combined reward beside the total
            terms = sorted({k for _, k in logged if k.startswith("reward/")})
            keys = keys + tuple(terms) if len(terms) > 1 else keys
        if any((split, key) in logged for split in panel.splits for key in keys):
            out.append(Panel(panel.title, keys, panel.splits))
    return out


def first_last(run: Run, key: str, split: str = "train") -> tuple[float, float, int] | None:
    """The mean of the first and of the last tenth of a figure's logged values (at least one value each,
    at most 10: one batch's loss is noisy), and how many each mean took; None with fewer than two values.

    >>> from pathlib import Path
    >>> first_last(Run("r", Path("."), metrics=[{"split": "train", "step": i, "loss": float(i)} for i in range(20)]),
    ...            "loss")
    (0.5, 18.5, 2)
    """
    values = [v for _, v in run.series(key, split) if v is not None]
    if len(values) < 2:
        return None
    n = min(10, max(1, len(values) // 10))
    return sum(values[:n]) / n, sum(values[-n:]) / n, n
