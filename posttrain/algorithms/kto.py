"""KTO: unpaired desirable / undesirable completions, one loss in :mod:`posttrain.losses.kto`.

The formula, paper and equation live in the loss's docstring and docs/algorithms.md. The KL baseline
``z0`` is a statistic of the whole global batch, estimated by the task (``posttrain.training.kto``) and
passed in here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from posttrain import losses
from posttrain.algorithms.base import Algorithm
from posttrain.errors import check
from posttrain.losses import LossOutput


@dataclass(frozen=True)
class KTO(Algorithm):
    """Ethayarajh et al. 2024. Defaults: ``beta`` 0.1 and ``λ_D = λ_U = 1`` (the paper's defaults).

    Learning rate 1e-6: TRL's ``KTOConfig`` default and the most that TRL's KTO guide advises at
    ``beta = 0.1`` (its recommended range is 5e-7 to 5e-6). The paper's main experiments reuse DPO's
    training setup; see docs/algorithms.md.
    """

    name: ClassVar[str] = "kto"
    data_kind: ClassVar[str] = "unpaired"
    needs_reference: ClassVar[bool] = True
    default_learning_rate: ClassVar[float] = 1e-6
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            check(value > 0, name, f"must be > 0, got {value}")

    def loss(self, policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl_baseline: Tensor) -> LossOutput:
        return losses.kto(
            policy_logps=policy_logps,
            ref_logps=ref_logps,
            labels=labels,
            kl_baseline=kl_baseline,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )


KTO_RANGE = (1.0, 4 / 3)  # KTO paper: lambda_D * n_D / (lambda_U * n_U) should lie in [1, 4/3]


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U) putting lambda_D n_D / (lambda_U n_U) in [1, 4/3]; the larger class keeps weight 1.

    >>> kto_weights(100, 300), kto_weights(100, 90), kto_weights(400, 100)
    ((3.0, 1.0), (1.0, 1.0), (1.0, 3.0))
    """
    ratio = n_desirable / n_undesirable
    if ratio < KTO_RANGE[0]:  # raise lambda_D to the lower end
        return _round_up(1 / ratio), 1.0
    if ratio > KTO_RANGE[1]:  # raise lambda_U to the upper end
        return 1.0, _round_up(ratio / KTO_RANGE[1])
    return 1.0, 1.0


def _round_up(x: float) -> float:
    """Two decimals, rounded up, so that a weight raised to reach the range stays inside it."""
    return math.ceil(round(x * 100, 6)) / 100
