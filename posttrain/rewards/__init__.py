"""Reward functions for the online methods: plain callables ``(prompts, completions, **columns) -> list[float]``.

:class:`RewardModelScorer` wraps a reward model trained with ``method: reward`` (or any one-output sequence
classifier) to that signature. :mod:`posttrain.rewards.rules` holds the rule-based rewards (numeric answer,
format regex, length penalty, DAPO's overlong punishment); :mod:`posttrain.rewards.combine` loads rewards
from config entries and adds them up with weights.
"""

from posttrain.rewards.combine import (
    BUILTIN_REWARDS,
    CombinedReward,
    NamedReward,
    RewardError,
    RewardScores,
    load_reward,
    load_rewards,
)
from posttrain.rewards.model import RewardModelScorer
from posttrain.rewards.rules import (
    LengthPenalty,
    NumericAnswer,
    RegexFormat,
    RewardFn,
    SoftOverlongPunishment,
    TruncationPenalty,
    extract_number,
)

__all__ = [
    "BUILTIN_REWARDS",
    "CombinedReward",
    "LengthPenalty",
    "NamedReward",
    "NumericAnswer",
    "RegexFormat",
    "RewardError",
    "RewardFn",
    "RewardModelScorer",
    "RewardScores",
    "SoftOverlongPunishment",
    "TruncationPenalty",
    "extract_number",
    "load_reward",
    "load_rewards",
]
