"""Advantage estimators of the online methods: pure functions of tensors, importing only torch.

Group layout, shared by :func:`group_advantages`, :func:`tied_groups` and :func:`rloo_advantages`: ``rewards``
is ``(N,)`` with ``N = prompts x G``, laid out group after group, so the ``G`` completions of prompt ``p`` sit
at ``p * G ... p * G + G - 1`` (what repeating each prompt ``G`` times before generation gives). A group's
statistics are its own, so every group must be whole in the tensor passed in: the loop computes advantages
once per rollout batch, on the rewards of whole groups, before splitting into micro-batches.

Standard deviation: the UNBIASED one (Bessel's ``n - 1``, ``torch.std``'s default) in both
:func:`group_advantages` and :func:`whiten`. DeepSeekMath does not say which it uses; TRL's GRPOTrainer,
verl and OpenRLHF all call ``torch.std`` with its default, so this is the number that "GRPO with G = 8"
means in the runs people compare against. With ``G`` completions it is ``sqrt(G / (G - 1))`` times the
population std (1.069 at ``G = 8``), so the advantages are that much smaller.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from posttrain.host import host_values

__all__ = [
    "adaptive_kl_coef", "explained_variance", "gae", "group_advantages", "ppo_token_rewards", "rloo_advantages",
    "tied_groups", "whiten",
]  # fmt: skip


def _grouped(rewards: Tensor, size: int, name: str) -> Tensor:
    """``(N,)`` rewards as ``(prompts, size)``, floating point; checks the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if size < 2:
        raise ValueError(f"{name} must be >= 2 (a group of one has no baseline), got {size}")
    if rewards.numel() % size != 0:
        raise ValueError(f"len(rewards) = {rewards.numel()} is not a multiple of {name} = {size}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.view(-1, size)


def _zero_tied(advantages: Tensor, grouped: Tensor) -> Tensor:
    """Exactly 0 for every completion of a group whose rewards are all equal.

    Centring alone does not give it: the mean of three float64 ``0.1`` is not ``0.1``, the deviations are
    ``-1.4e-17`` and so is the std, and their ratio (with ``eps = 0``) is about ``-0.8``, not 0.
    """
    tied = (grouped.amax(-1) == grouped.amin(-1)).unsqueeze(-1)
    return torch.where(tied, torch.zeros_like(advantages), advantages)


def tied_groups(rewards: Tensor, group_size: int, *, atol: float = 0.0) -> Tensor:
    """``(prompts,)`` bool: True where a group's rewards span at most ``atol`` (``max - min <= atol``).

    Such a group has zero advantage for every completion, so it adds nothing to the policy gradient but
    still dilutes the batch. DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, Sec. 3.2, the
    constraint ``0 < |{o_i : o_i correct}| < G`` of their objective) drops these groups and samples more
    prompts until the batch is full; this function says which to drop.

    >>> tied_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    tensor([ True, False])
    """
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    grouped = _grouped(rewards, group_size, "group_size")
    return (grouped.amax(-1) - grouped.amin(-1)) <= atol


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: Literal["std", "none"] = "std", eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages, ``(N,)`` in and out.

    ``scale="std"``: ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the ``G = group_size`` rewards of the
    prompt: GRPO's outcome-supervision advantage, Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300),
    Sec. 4.1.2, used in their objective Eq. 3. ``std`` is the unbiased one (see the module docstring);
    ``eps = 1e-4`` as in TRL.

    ``scale="none"``: ``A_i = r_i - mean(r)``, Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective" (arXiv:2503.20783), Sec. 3.1 and Fig. 1: dividing by the std weights
    prompts by how unanimous their answers are (near-unanimous groups get large advantages), a bias the
    policy gradient does not have.

    A group whose rewards are all equal (a tie, see :func:`tied_groups` with ``atol = 0``) gets exactly 0,
    never NaN, whatever ``eps``.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3, scale="none")
    tensor([ 0.6667, -0.3333, -0.3333,  0.0000,  0.0000,  0.0000])
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    grouped = _grouped(rewards, group_size, "group_size")
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale == "std":
        advantages = advantages / (grouped.std(-1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    return _zero_tied(advantages, grouped).reshape(-1)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """Leave-one-out advantages, ``A_i = r_i - (1 / (k - 1)) * sum_{j != i} r_j``, ``(N,)`` in and out.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (arXiv:2402.14740), the RLOO estimator of their Sec. "REINFORCE Leave-One-Out":
    ``(1/k) sum_i [R(y_i, x) - 1/(k-1) sum_{j != i} R(y_j, x)] grad log pi(y_i | x)``. The baseline of a
    sample excludes the sample itself, so it is independent of it and the estimator stays unbiased. It
    equals ``k / (k - 1) * (r_i - mean(r))``, i.e. ``k / (k - 1)`` times the Dr. GRPO advantage. ``k`` is the
    number of completions per prompt (``>= 2``). In the paper ``R`` already holds the sequence-level KL
    penalty ``-beta * log(pi / pi_ref)``; the caller adds it to ``rewards``. Tied groups get exactly 0.

    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    tensor([ 1.0000, -0.5000, -0.5000])
    """
    grouped = _grouped(rewards, k, "k")
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return _zero_tied(grouped - baseline, grouped).reshape(-1)


def _check_one_run(valid: Tensor) -> None:
    """GAE's episode is one contiguous run of valid tokens per row (prompt before it, padding after). Checked
    where it is free (host tensors): on an accelerator it would cost a read per rollout."""
    if valid.device.type != "cpu":
        return
    starts = valid[:, :1].sum(-1) + (valid[:, 1:] & ~valid[:, :-1]).sum(-1)
    if any(host_values(starts > 1)):
        rows = [i for i, gap in enumerate(host_values(starts > 1)) if gap]
        raise ValueError(f"mask must be one contiguous run of valid tokens per row; rows {rows} have gaps")


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation per token: ``(advantages, returns)``, each ``(B, T)``.

    Schulman, Moritz, Levine, Jordan & Abbeel 2016, "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation" (arXiv:1506.02438), Eq. 16::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_l (gamma * lam)^l * delta_{t+l}  =  delta_t + gamma * lam * A_{t+1}
        returns = A + V                                   (the lambda-return, PPO's value target)

    Inputs are ``(B, T)``, aligned with the tokens as the log-probs are: ``rewards[b, t]`` the reward for
    token ``t`` (typically the score on the last token plus a per-token KL penalty), ``values[b, t]`` the
    value of the state that generated token ``t``, and ``mask`` the valid response tokens, one contiguous run
    per row. The episode ends where the mask ends: ``V`` after the last valid token is 0, and rewards and
    values off the mask are ignored. Both outputs are 0 off the mask and carry no gradient (they are
    targets; the inputs are detached). Runs backwards over ``T`` in a Python loop, ``T`` small kernels.
    """
    if not (rewards.shape == values.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must share one (B, T) shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    valid = mask.to(torch.bool)
    _check_one_run(valid)
    rewards = torch.where(valid, rewards.detach(), 0.0)
    values = torch.where(valid, values.detach(), 0.0)
    next_value = values.new_zeros(values.shape[0])  # V past the end of the row: 0
    next_advantage = values.new_zeros(values.shape[0])
    backwards = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Off the mask the advantage is 0, so the last valid token starts its recursion from A = 0.
        next_advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, 0.0)
        next_value = values[:, t]
        backwards.append(next_advantage)
    advantages = torch.stack(backwards[::-1], dim=1)
    return advantages, advantages + values


def whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` over the valid entries, 0 off the mask.

    ``mean`` and the unbiased ``var`` are taken over every valid entry of the tensor (all rows together),
    so pass the whole rollout batch (gathered across processes), not a micro-batch. With
    ``shift_mean=False`` the mean is added back: only the scale changes (used for rewards, whose sign
    matters). The usual PPO advantage normalisation (Huang et al. 2022, "The 37 Implementation Details of
    Proximal Policy Optimization", ICLR Blog Track, "Normalization of Advantages"). Needs two valid entries.

    >>> whiten(torch.tensor([[2.0, 4.0, 6.0, 100.0]]), torch.tensor([[1, 1, 1, 0]]))
    tensor([[-1.,  0.,  1.,  0.]])
    """
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must share a shape, got {tuple(values.shape)}, {tuple(mask.shape)}")
    valid = mask.to(torch.bool)
    count = valid.sum()
    # Checked where it is free (host tensors); a caller on an accelerator checks its host-side count first.
    if valid.device.type == "cpu" and host_values(count) < 2:
        raise ValueError(f"whiten needs at least 2 valid entries, got {host_values(count)}")
    mean = torch.where(valid, values, 0.0).sum() / count
    var = torch.where(valid, values - mean, 0.0).pow(2).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, 0.0)


def ppo_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """PPO's per-token reward for RLHF: ``r_t = -beta * kl_t`` on every completion token, plus the sequence's
    score on its last one. Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences",
    arXiv:1909.08593), Eq. 2, and InstructGPT (Ouyang et al. 2022, Eq. 2): ``R(x, y) = r(x, y) - beta log
    (pi(y|x) / pi_ref(y|x))``, with the KL spread over the tokens that produced it (k1 per token).

    ``scores`` (B,), ``kl`` and ``mask`` (B, T); a row with no valid token gets nothing (its score is dropped,
    as a masked truncated completion's is). Below: row 0's tokens are 1 and 2, row 1's token 1 only.

    >>> kl = torch.tensor([[0.0, 0.5, -1.0], [0.0, 2.0, 9.0]]); mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    >>> ppo_token_rewards(torch.tensor([1.0, -1.0]), kl, mask, beta=0.1)
    tensor([[ 0.0000, -0.0500,  1.1000],
            [ 0.0000, -1.2000,  0.0000]])
    """
    if kl.shape != mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(f"scores (B,), kl and mask (B, T) expected, got {scores.shape}, {kl.shape}, {mask.shape}")
    valid = mask.to(torch.bool)
    rewards = torch.where(valid, -beta * kl, 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(-1)  # (B,) index of the last valid token, -1 when none
    rows = torch.nonzero(last >= 0).flatten()
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the valid tokens: 1 when the critic predicts the returns, 0 when it
    does no better than their mean, negative when worse (the PPO diagnostic of OpenAI Baselines). Below,
    R = (1, 2, 3, 5) has unbiased variance 8.75 / 3 and R - V = (0, 0, 0, 1) has 0.75 / 3: 1 - 0.75 / 8.75.
    NaN with fewer than 2 valid tokens or constant returns. A 0-dim float64 tensor on the inputs' device
    (no read: the loop reads it with the step's other figures).

    >>> mask = torch.ones(1, 4, dtype=torch.bool)
    >>> float(explained_variance(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1.0, 2.0, 3.0, 5.0]]), mask))
    0.9142857142857143
    """
    valid = mask.to(torch.bool)
    r, v = returns.double(), values.double()
    count = valid.sum()

    def variance(x: Tensor) -> Tensor:  # unbiased, over the valid entries
        mean = torch.where(valid, x, 0.0).sum() / count.clamp(min=1)
        return torch.where(valid, x - mean, 0.0).pow(2).sum() / (count - 1).clamp(min=1)

    var_r = variance(r)
    ratio = 1.0 - variance(r - v) / torch.where(var_r == 0, 1.0, var_r)
    return torch.where((count < 2) | (var_r == 0), torch.full_like(ratio, float("nan")), ratio)


def adaptive_kl_coef(beta: float, kl: float, target: float, gain: float = 0.1) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (arXiv:1909.08593), Sec. 2.2:
    ``e = clip(KL / KL_target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + K_beta * e)``, ``K_beta = 0.1``.
    ``kl`` is the measured policy-to-reference KL of the step (nats per sequence).

    >>> adaptive_kl_coef(0.1, kl=12.0, target=6.0), adaptive_kl_coef(0.1, kl=5.4, target=6.0)
    (0.10200000000000001, 0.099)
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + gain * error)
