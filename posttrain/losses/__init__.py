"""Losses: pure functions of tensors, importing only torch.

Each returns a :class:`LossOutput` holding the UNREDUCED loss and detached per-example metrics; the training
loop reduces it with :func:`aggregate` over global counts.

Reduction:
    LossOutput   what every loss returns: ``loss`` (unreduced) and ``metrics``
    aggregate    sum the unreduced loss and divide by the global example or token count

Pairwise preference losses (``(B,)`` summed completion log-probs in, ``(B,)`` loss out):
    dpo          DPO, Rafailov et al. 2023; optional RPO NLL term (``rpo_alpha``), Pang et al. 2024
    ipo          IPO, Azar et al. 2023; summed log-probs, or per-token means with ``length_normalize``
    cdpo         conservative DPO (label smoothing), Mitchell 2023
    robust_dpo   robust DPO (unbiased under label flips), Chowdhury et al. 2024
    hinge        hinge loss on the DPO margin (RSO ``hinge-norm``), Liu et al. 2023
    simpo        SimPO, reference-free, per-token means and a target margin, Meng et al. 2024
    orpo         ORPO, reference-free, SFT plus an odds-ratio term, Hong et al. 2024
    distill      reward distillation: the implicit reward margin regressed onto each pair's reward margin,
                 Fisch et al. 2024 (REBEL, Gao et al. 2024, with the previous iterate as reference)

Reward model (``(B,)`` scalar scores in, ``(B,)`` loss out):
    bradley_terry  Bradley-Terry pairwise loss (InstructGPT Eq. 1), optional margin (Llama 2 Eq. 2) and
                   centering term (Eisenstein et al. 2023)

Unpaired feedback (``(B,)`` summed log-probs and labels in, ``(B,)`` loss out):
    kto          KTO, Ethayarajh et al. 2024; desirable / undesirable examples against a KL baseline

Supervised fine-tuning (``(B, T)`` per-token log-probs in, ``(B, T)`` loss out):
    sft          token-level negative log-likelihood on the trained tokens

Online methods (``(B, T)`` per-token log-probs in, see posttrain/losses/policy.py):
    ppo_clip     PPO clipped surrogate (Schulman et al. 2017), DAPO clip-higher, GSPO sequence ratio
    kl_k1, kl_k3 per-token KL estimators (Schulman 2020; k3 is GRPO's KL term)
    aggregate_policy_loss  the "grpo", "dapo" and "dr_grpo" reductions over global counts
    rloo_loss    REINFORCE on summed log-probs with leave-one-out advantages (Ahmadian et al. 2024)
    value_loss   PPO's clipped value loss

See docs/algorithms.md for the formulas, equations cited and paper-faithful configurations.
"""

from posttrain.losses.aggregate import LossOutput, aggregate
from posttrain.losses.kto import kto
from posttrain.losses.policy import aggregate_policy_loss, kl_k1, kl_k3, ppo_clip, rloo_loss, value_loss
from posttrain.losses.preference import cdpo, distill, dpo, hinge, ipo, orpo, robust_dpo, simpo
from posttrain.losses.reward_model import bradley_terry
from posttrain.losses.sft import sft

__all__ = [
    "LossOutput",
    "aggregate",
    "aggregate_policy_loss",
    "bradley_terry",
    "cdpo",
    "distill",
    "dpo",
    "hinge",
    "ipo",
    "kl_k1",
    "kl_k3",
    "kto",
    "orpo",
    "ppo_clip",
    "rloo_loss",
    "robust_dpo",
    "sft",
    "simpo",
    "value_loss",
]
