"""Pairwise preference losses: DPO and the variants that take the same chosen/rejected inputs.

Every function is pure, keyword-only, and returns :class:`LossOutput` with the loss UNREDUCED, shape
``(B,)``; the loop reduces it with :func:`posttrain.losses.aggregate.aggregate` and the number of pairs in
the whole optimizer step.

Input conventions, shared by all functions:

* ``policy_chosen_logps``, ``policy_rejected_logps``, ``ref_chosen_logps``, ``ref_rejected_logps``: ``(B,)``
  float tensors, each the SUM of token log-probabilities over the completion tokens (prompt masked out).
* ``chosen_lengths``, ``rejected_lengths``: ``(B,)`` completion token counts (int or float, positive), the
  number of tokens in those sums. Methods defined on per-token means (SimPO, ORPO, the RPO term, IPO with
  ``length_normalize``) divide by them; the others use the sums, as their papers do.
* Metrics are detached ``(B,)`` tensors with the same keys for every loss: ``chosen_rewards``,
  ``rejected_rewards``, ``margins`` (chosen minus rejected) and ``accuracy`` (1.0 where the chosen reward is
  strictly larger, else 0.0), plus ``nll`` and ``log_odds_ratio`` where a loss has those terms.

Notation below: ``pc, pr`` policy chosen/rejected logps, ``rc, rr`` reference ones, ``|yc|, |yr|`` the
lengths, ``h = (pc - rc) - (pr - rr)`` the log-ratio margin, ``σ`` the logistic function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.losses.aggregate import LossOutput

__all__ = ["cdpo", "distill", "dpo", "hinge", "ipo", "orpo", "robust_dpo", "simpo"]


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def _log_ratio_margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    """``h = (pc - rc) - (pr - rr)``: how much more the policy moved towards chosen than towards rejected."""
    return (pc - rc) - (pr - rr)


def _neg_logsigmoid(x: Tensor) -> Tensor:
    """``-log σ(x)``, the Bradley-Terry negative log-likelihood, without overflow for large ``|x|``."""
    return -F.logsigmoid(x)


def _metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, **extra: Tensor) -> dict[str, Tensor]:
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "chosen_rewards": chosen,
        "rejected_rewards": rejected,
        "margins": chosen - rejected,
        "accuracy": (chosen > rejected).to(chosen.dtype),
    }
    metrics.update({name: value.detach() for name, value in extra.items()})
    return metrics


def _implicit_reward_metrics(
    beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, **extra: Tensor
) -> dict[str, Tensor]:
    """Metrics for reference-based losses: DPO's implicit rewards ``beta * (policy - ref)`` per side."""
    return _metrics(beta * (pc - rc), beta * (pr - rr), **extra)


def _required(lengths: Tensor | None, name: str, reason: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"{name} is required when {reason}")
    return lengths


def _per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """Mean token log-prob ``logps / lengths``, ``(B,)``."""
    return logps / lengths.to(logps.dtype)


def _log1m_exp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range.

    ``log1p(-exp(x))`` loses every digit as ``x -> 0`` and ``log(-expm1(x))`` as ``x -> -inf``; switching at
    ``x = -log 2`` keeps full precision on both sides (Mächler 2012, "Accurately computing
    log(1 - exp(-|a|))"). Each branch is fed only inputs from its own side, so the branch that
    ``torch.where`` discards never produces an infinity whose zero-weighted gradient would be NaN.
    ``x`` is clamped just below 0: a mean log-prob that rounds to exactly 0 then gives a large finite
    log-odds instead of ``inf``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2.0)
    near = torch.log(-torch.expm1(torch.where(near_zero, x, -math.log(2.0))))
    far = torch.log1p(-torch.exp(torch.where(near_zero, -math.log(2.0), x)))
    return torch.where(near_zero, near, far)


def _check_label_smoothing(label_smoothing: float, *, upper: float, closed: bool) -> None:
    ok = 0.0 <= label_smoothing <= upper if closed else 0.0 <= label_smoothing < upper
    if not ok:
        bracket = "]" if closed else ")"
        raise ValueError(f"label_smoothing must be in [0, {upper}{bracket}, got {label_smoothing}")


# ----------------------------------------------------------------------------------------------------------
# Reference-based losses


def dpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    rpo_alpha: float = 0.0,
    chosen_lengths: Tensor | None = None,
) -> LossOutput:
    """Direct Preference Optimization, optionally with the RPO negative log-likelihood term.

    ``loss = -log σ(beta * h) + rpo_alpha * (-pc / |yc|)``, shapes ``(B,)`` in and out.

    The first term is Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7, on summed log-probs. The second is the
    NLL of the chosen completion added by Pang et al. 2024, "Iterative Reasoning Preference Optimization"
    (arXiv:2404.19733), Eq. 1, where it is divided by the chosen length (a per-token mean per example, not a
    sum); the paper uses ``rpo_alpha = 1``. ``chosen_lengths`` is required when ``rpo_alpha > 0``.

    Metrics: ``chosen_rewards = beta * (pc - rc)``, ``rejected_rewards = beta * (pr - rr)``, ``margins``,
    ``accuracy``; plus ``nll`` (``-pc / |yc|``) when ``rpo_alpha > 0``.
    """
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    loss = _neg_logsigmoid(beta * _log_ratio_margin(pc, pr, rc, rr))
    extra: dict[str, Tensor] = {}
    if rpo_alpha > 0:
        nll = -_per_token(pc, _required(chosen_lengths, "chosen_lengths", "rpo_alpha > 0"))
        loss = loss + rpo_alpha * nll
        extra["nll"] = nll
    return LossOutput(loss=loss, metrics=_implicit_reward_metrics(beta, pc, pr, rc, rr, **extra))


def ipo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    length_normalize: bool = False,
) -> LossOutput:
    """Identity Preference Optimization: ``loss = (h - 1 / (2 * beta))^2``, shapes ``(B,)``.

    Azar et al. 2023 (arXiv:2310.12036), Eq. 17, with ``beta`` in the role of the paper's ``τ``. ``h`` is
    NOT multiplied by ``beta``: IPO regresses the raw log-ratio margin onto the target ``1 / (2 beta)``.

    Length convention: by default ``h`` uses summed log-probs, as in the paper. With
    ``length_normalize=True`` each of the four log-probs is first divided by its completion length
    (policy and reference chosen by ``chosen_lengths``, the rejected pair by ``rejected_lengths``), which is
    what TRL does; ``h`` is then a difference of per-token means and ``beta`` needs re-tuning. Both lengths
    are required in that case.

    Metrics: ``beta * (policy - ref)`` per side, computed from the same (possibly normalised) log-probs.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if length_normalize:
        reason = "length_normalize=True"
        chosen_n = _required(chosen_lengths, "chosen_lengths", reason)
        rejected_n = _required(rejected_lengths, "rejected_lengths", reason)
        pc, rc = _per_token(pc, chosen_n), _per_token(rc, chosen_n)
        pr, rr = _per_token(pr, rejected_n), _per_token(rr, rejected_n)
    loss = (_log_ratio_margin(pc, pr, rc, rr) - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(loss=loss, metrics=_implicit_reward_metrics(beta, pc, pr, rc, rr))


def distill(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    margin: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """Reward distillation: ``loss = (beta * h - m)^2``, ``m`` the pair's reward margin, shapes ``(B,)``.

    Fisch et al. 2024, "Robust Preference Optimization through Reward Model Distillation" (arXiv:2405.19316,
    TMLR 2025), the distillation objective of their Sec. 3 with a single target reward: the implicit reward
    margin ``beta * h`` is regressed onto the explicit one, ``m = r(x, chosen) - r(x, rejected)``. Where DPO
    pushes ``h`` to infinity on a deterministic label and IPO to the same ``1 / (2 beta)`` for every pair,
    each pair here has its own target, ``m / beta``, and the minimiser over all pairs is the policy of
    KL-regularised reward maximisation, ``pi_ref * exp(r / beta)`` (DPO paper, Eq. 4): the point on the
    reward-vs-KL frontier that ``beta`` names, whichever pairs are drawn. With the reference moved to the
    previous iterate each round (iterative_dpo's ``reference_update: last``) it is REBEL's regression of
    relative rewards (Gao et al. 2024, arXiv:2404.16767, Algorithm 1, with ``eta = 1 / beta``).

    ``margin``: ``(B,)`` reward margins, chosen minus rejected (any sign). Summed log-probs, as in the papers.

    Metrics: ``beta * (policy - ref)`` per side, and ``target_margin`` (``m``).
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    m = margin.to(pc.dtype)
    loss = (beta * _log_ratio_margin(pc, pr, rc, rr) - m) ** 2
    return LossOutput(loss=loss, metrics=_implicit_reward_metrics(beta, pc, pr, rc, rr, target_margin=m))


def cdpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Conservative DPO: ``loss = (1 - eps) * l(h) + eps * l(-h)``, ``l(x) = -log σ(beta * x)``, ``(B,)``.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (the cDPO objective;
    https://ericmitchell.ai/cdpo.pdf): the DPO cross-entropy against a soft label that says the recorded
    preference is right with probability ``1 - eps``. It is minimised at a finite margin,
    ``σ(beta * h) = 1 - eps``, so the policy stops pushing once it agrees with the label at that confidence.
    Summed log-probs; ``eps = label_smoothing`` in ``[0, 0.5]``; ``eps = 0`` is :func:`dpo`.

    Metrics: ``beta * (policy - ref)`` per side.
    """
    _check_label_smoothing(label_smoothing, upper=0.5, closed=True)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    logits = beta * _log_ratio_margin(pc, pr, rc, rr)
    loss = (1.0 - label_smoothing) * _neg_logsigmoid(logits) + label_smoothing * _neg_logsigmoid(-logits)
    return LossOutput(loss=loss, metrics=_implicit_reward_metrics(beta, pc, pr, rc, rr))


def robust_dpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Robust DPO: ``loss = ((1 - eps) * l(h) - eps * l(-h)) / (1 - 2 * eps)``, ``l(x) = -log σ(beta * x)``.

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO" (arXiv:2403.00409), the de-biased loss
    ``ℓ̂_ε`` of their robust-DPO section: if each label was flipped independently with probability ``eps``,
    its expectation over the flips equals the DPO loss on clean labels. Unlike :func:`cdpo` it is not a
    cross-entropy: it falls linearly in ``h`` for large ``h`` and can be negative. Summed log-probs;
    ``eps = label_smoothing`` in ``[0, 0.5)``; ``eps = 0`` is :func:`dpo`. Shapes ``(B,)``.

    Metrics: ``beta * (policy - ref)`` per side.
    """
    _check_label_smoothing(label_smoothing, upper=0.5, closed=False)
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    logits = beta * _log_ratio_margin(pc, pr, rc, rr)
    eps = label_smoothing
    loss = ((1.0 - eps) * _neg_logsigmoid(logits) - eps * _neg_logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return LossOutput(loss=loss, metrics=_implicit_reward_metrics(beta, pc, pr, rc, rr))


def hinge(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """Hinge loss on the DPO margin: ``loss = max(0, 1 - beta * h)``, shapes ``(B,)``.

    The ``hinge-norm`` loss of RSO, Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
    Optimization" (arXiv:2309.06657): SLiC's hinge applied to reference-normalised log-likelihoods, with
    our ``beta`` in the role of the paper's ``γ``. Pairs whose scaled margin already exceeds 1 contribute
    neither loss nor gradient. Summed log-probs.

    Metrics: ``beta * (policy - ref)`` per side.
    """
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    loss = torch.relu(1.0 - beta * _log_ratio_margin(pc, pr, rc, rr))
    return LossOutput(loss=loss, metrics=_implicit_reward_metrics(beta, pc, pr, rc, rr))


# ----------------------------------------------------------------------------------------------------------
# Reference-free losses (per-token means)


def simpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> LossOutput:
    """SimPO: ``loss = -log σ(beta * (pc / |yc| - pr / |yr|) - gamma)``, shapes ``(B,)``, no reference.

    Meng, Xia & Chen 2024 (arXiv:2405.14734), Eq. 6. The implicit reward is ``beta`` times the MEAN token
    log-prob (the sums are divided by the completion lengths here), and ``gamma`` is a target margin that is
    subtracted after scaling, not multiplied by ``beta``. Defaults: ``beta = 2.0`` (the paper uses 2.0 or
    2.5) and ``gamma = 1.0``, i.e. ``gamma / beta = 0.5``, the starting ratio the authors recommend in
    their repository and the value they used for Llama-3-8B Base.

    Metrics: ``chosen_rewards = beta * pc / |yc|``, ``rejected_rewards = beta * pr / |yr|`` (margins exclude
    ``gamma``).
    """
    chosen_rewards = beta * _per_token(policy_chosen_logps, chosen_lengths)
    rejected_rewards = beta * _per_token(policy_rejected_logps, rejected_lengths)
    loss = _neg_logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(loss=loss, metrics=_metrics(chosen_rewards, rejected_rewards))


def orpo(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    orpo_lambda: float = 0.1,
) -> LossOutput:
    """ORPO: ``loss = -mc + orpo_lambda * -log σ(log odds(mc) - log odds(mr))``, shapes ``(B,)``.

    Hong, Lee & Thorne 2024 (arXiv:2403.07691), Eqs. 6-7, no reference model. ``mc = pc / |yc|`` and
    ``mr = pr / |yr|`` are mean token log-probs; the paper's sequence probability is ``P = exp(m)`` and
    ``log odds(m) = log P - log(1 - P) = m - log(1 - exp(m))``, computed stably (see :func:`_log1m_exp`).
    The first term is the SFT loss on the chosen completion as a per-token mean per example.
    ``orpo_lambda`` is the paper's ``λ``, default 0.1.

    Metrics: ``chosen_rewards = mc`` and ``rejected_rewards = mr``, the mean token log-probs, unscaled
    (ORPO has no temperature on them, and ``orpo_lambda`` weights a loss term, not a reward; TRL instead
    logs them multiplied by ``λ``). Since log-odds are increasing in ``m``, ``accuracy`` is also
    ``log_odds_ratio > 0``. Extra: ``nll`` (``-mc``) and ``log_odds_ratio``.
    """
    chosen_mean = _per_token(policy_chosen_logps, chosen_lengths)
    rejected_mean = _per_token(policy_rejected_logps, rejected_lengths)
    log_odds_ratio = (chosen_mean - _log1m_exp(chosen_mean)) - (rejected_mean - _log1m_exp(rejected_mean))
    nll = -chosen_mean
    loss = nll + orpo_lambda * _neg_logsigmoid(log_odds_ratio)
    metrics = _metrics(chosen_mean, rejected_mean, nll=nll, log_odds_ratio=log_odds_ratio)
    return LossOutput(loss=loss, metrics=metrics)
