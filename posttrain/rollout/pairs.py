"""Preference pairs from a policy's own samples (the seeds' path@N, iterative DPO)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    prompt_index: int
    chosen: int  # index of the best sample (in prompt-major order)
    rejected: int  # index of the worst sample
    margin: float  # best reward - worst reward


def best_worst_pairs(rewards: Sequence[float], n: int, tie_threshold: float = 0.0, per_prompt: int = 1) -> list[Pair]:
    """For each prompt's n samples (prompt-major order), pair the best against the worst; drop a pair whose
    best - worst <= ``tie_threshold`` (no preference to learn). Among equal rewards the first sample is
    taken first, as the best and as the worst.

    ``per_prompt`` = k > 1 pairs the i-th best against the i-th worst for i = 1..k (k <= n // 2): the
    best-vs-worst pair first, the margins shrinking towards the middle of the ranking, each pair within
    ``tie_threshold`` dropped alone. A kept pair's two samples differ in reward, so no sample sits in two kept
    pairs (were s the i-th best and the j-th worst, its pair i would need a worse sample ranked before it
    among the worst, i < j, and its pair j a better one ranked before it among the best, j < i).

    >>> best_worst_pairs([1.0, 0.0, 0.5,  0.2, 0.2, 0.2,  0.0, 0.9, 1.0], n=3)
    [Pair(prompt_index=0, chosen=0, rejected=1, margin=1.0), Pair(prompt_index=2, chosen=8, rejected=6, margin=1.0)]
    >>> best_worst_pairs([0.5, 0.4], n=2, tie_threshold=0.1)
    []
    >>> best_worst_pairs([0.0, 1.0, 0.25, 0.75], n=4, per_prompt=2)
    [Pair(prompt_index=0, chosen=1, rejected=0, margin=1.0), Pair(prompt_index=0, chosen=3, rejected=2, margin=0.5)]
    """
    if n < 2 or len(rewards) % n:
        raise ValueError(f"need n >= 2 samples per prompt and len(rewards) a multiple of n, got {len(rewards)}, {n}")
    if not 1 <= per_prompt <= n // 2:
        raise ValueError(f"need 1 <= per_prompt <= n // 2 = {n // 2}, got {per_prompt}")
    pairs = []
    for p in range(len(rewards) // n):
        group = list(rewards[p * n : (p + 1) * n])
        best_first = sorted(range(n), key=lambda i: (-group[i], i))
        worst_first = sorted(range(n), key=lambda i: (group[i], i))
        for best, worst in zip(best_first[:per_prompt], worst_first[:per_prompt], strict=True):
            margin = group[best] - group[worst]
            if margin > tie_threshold:
                pairs.append(Pair(p, p * n + best, p * n + worst, margin))
    return pairs
