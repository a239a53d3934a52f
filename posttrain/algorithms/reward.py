"""A Bradley-Terry reward model: :func:`posttrain.losses.bradley_terry` on a sequence classifier's scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from posttrain import losses
from posttrain.algorithms.base import Algorithm
from posttrain.errors import check
from posttrain.losses import LossOutput


@dataclass(frozen=True)
class RewardModel(Algorithm):
    """Trains a scalar reward ``r(x, y)`` on (prompt, chosen, rejected) pairs; no reference model.

    ``center_coef`` weights the centering term ``(rc + rr)^2`` (0 = plain Bradley-Terry; TRL recommends
    0.01). A per-pair ``margin`` comes from the data's optional ``margin`` column, not from the config.
    """

    name: ClassVar[str] = "reward"
    data_kind: ClassVar[str] = "reward"
    needs_reference: ClassVar[bool] = False
    # 1e-5: Llama 2's reward-model peak rate for every size below 70B (Touvron et al. 2023, §3.2.2; 5e-6 for
    # 70B), close to InstructGPT's 9e-6 for its 6B reward model (Ouyang et al. 2022, App. C.2). A new head
    # on a pretrained decoder, trained for about one epoch: far above the DPO family's 5e-7.
    default_learning_rate: ClassVar[float] = 1e-5
    center_coef: float = 0.0

    def __post_init__(self) -> None:
        check(self.center_coef >= 0, "center_coef", f"must be >= 0, got {self.center_coef}")

    def loss(self, chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> LossOutput:
        return losses.bradley_terry(
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            margin=margin,
            center_coef=self.center_coef,
        )
