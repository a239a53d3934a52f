"""Figures that compare a policy's samples with its reference's: win rate, distributions, sampled KL.

Pure functions over plain numbers and tensors; ``posttrain eval`` on an online run
(:mod:`posttrain.evaluate`) feeds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["distinct_n", "distribution", "sampled_kl", "sequence_log_ratio", "win_rate"]


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Paired comparison: sample j of prompt i under the policy against sample j of prompt i under the
    reference (the same prompt, the same position), scored by the same reward.

    ``win_rate = (wins + ties / 2) / n``, the share of pairs the policy wins with ties split evenly (as
    AlpacaEval and Chatbot Arena count them).

    >>> win_rate([1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 0.5])
    {'win_rate': 0.625, 'wins': 0.5, 'ties': 0.25, 'losses': 0.25}
    """
    if len(policy) != len(reference) or not policy:
        raise ValueError(f"need as many policy as reference scores, at least one; got {len(policy)}, {len(reference)}")
    n = len(policy)
    wins = sum(p > r for p, r in zip(policy, reference, strict=True))
    ties = sum(p == r for p, r in zip(policy, reference, strict=True))
    return {"win_rate": (wins + ties / 2) / n, "wins": wins / n, "ties": ties / n, "losses": (n - wins - ties) / n}


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, (unbiased) std and the 10/50/90th percentiles (linear interpolation, as ``torch.quantile``).

    >>> distribution([1.0, 2.0, 3.0, 4.0, 5.0])
    {'mean': 3.0, 'std': 1.5811, 'p10': 1.4, 'p50': 3.0, 'p90': 4.6}
    """
    if not values:
        raise ValueError("distribution of no values")
    x = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    std = float(x.std()) if len(values) > 1 else 0.0
    return {"mean": round(float(x.mean()), 4), "std": round(std, 4), "p10": round(q[0], 4),
            "p50": round(q[1], 4), "p90": round(q[2], 4)}  # fmt: skip


def sampled_kl(policy_logps: Tensor, ref_logps: Tensor, mask: Tensor) -> dict[str, float]:
    """KL(policy || reference) estimated on samples drawn from the policy, all ``(N, T)`` per-token
    log-probs of the sampled tokens (at the sampling temperature) with the completion ``mask``.

    ``kl_seq`` is the mean over samples of the summed log-ratio ``sum_t (pol - ref)`` (k1 of Schulman 2020,
    "Approximating KL Divergence": unbiased for the sequence-level KL, but of high variance and can come out
    negative on few samples); ``kl_token_k3`` is the mean of ``exp(ref - pol) - (ref - pol) - 1`` per token
    (k3: never negative, lower variance). Below, the log-ratios are 0.5 and -0.5 (sample 0, sum 0) and 1.0
    (sample 1), so kl_seq = (0 + 1) / 2; k3 = (0.10653 + 0.14872 + 0.36788) / 3 = 0.20771.

    >>> pol = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]]); ref = torch.tensor([[-1.5, -1.5], [-2.0, 0.0]])
    >>> mask = torch.tensor([[True, True], [True, False]])
    >>> {k: round(v, 4) for k, v in sampled_kl(pol, ref, mask).items()}
    {'kl_seq': 0.5, 'kl_token_k3': 0.2077}
    """
    m = mask.to(policy_logps.dtype)
    log_ratio = (policy_logps - ref_logps) * m  # (N, T)
    k3 = (torch.expm1(-log_ratio) + log_ratio) * m  # exp(ref - pol) - 1 - (ref - pol)
    kl_seq = float(sequence_log_ratio(policy_logps, ref_logps, mask).mean())
    return {"kl_seq": kl_seq, "kl_token_k3": float(k3.sum() / m.sum().clamp(min=1))}


def sequence_log_ratio(policy_logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """``(N,)``: each sample's summed log-ratio ``sum_t (pol - ref)`` over its completion ``mask``; on samples
    from the policy, its mean is the k1 estimate of the sequence-level KL(policy || reference).

    >>> sequence_log_ratio(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -3.0]]), torch.tensor([[True, False]]))
    tensor([0.5000])
    """
    return ((policy_logps - ref_logps) * mask.to(policy_logps.dtype)).sum(-1)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models",
    Sec. 4.3): the number of distinct word n-grams over the number of n-grams, pooled over all ``texts``
    (words: whitespace-separated, lower-cased). 1 when no n-gram repeats; a model that says the same words
    in every sample drifts towards 0. 0 when the texts hold no n-gram.

    >>> distinct_n(["the film was great", "the film was dull"], 2)  # 6 bigrams, 4 distinct
    0.6667
    """
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.lower().split()] for i in range(len(w) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else 0.0
