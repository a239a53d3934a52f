"""The DPO family: one small class per loss in :mod:`posttrain.losses.preference`.

Each ``loss`` maps the policy's (and, where needed, the reference's) per-pair log-probs to the method's
loss; the formulas, papers and defaults live in the loss functions' docstrings and docs/algorithms.md.
Validation names the config key and its allowed range.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from posttrain import losses
from posttrain.algorithms.base import Algorithm
from posttrain.errors import check
from posttrain.losses import LossOutput
from posttrain.model.logps import PairLogps


def _check_beta(beta: float) -> None:
    check(beta > 0, "beta", f"must be > 0, got {beta}")


@dataclass(frozen=True)
class PreferenceAlgorithm(Algorithm):
    """Trains on (prompt, chosen, rejected) pairs with one loss from :mod:`posttrain.losses`.

    Subclasses only name their loss function and declare their hyperparameters as fields: ``loss`` passes
    the log-probs the function takes (reference ones when ``needs_reference``; completion lengths where
    its signature asks for them) and every field as a keyword of the same name.
    """

    data_kind: ClassVar[str] = "preference"
    needs_reference: ClassVar[bool] = True
    needs_margin: ClassVar[bool] = False
    """Whether the loss reads each pair's ``margin`` (every row must then have one)."""
    loss_fn: ClassVar[Callable[..., LossOutput]]

    @classmethod
    def check_examples(cls, examples: Sequence[Any], source: str) -> None:
        if not cls.needs_margin:
            return
        from posttrain.data.formats import DataError

        for ex in examples:
            if ex.margin is None:
                why = "regresses onto each pair's reward margin (chosen's score minus rejected's)"
                raise DataError(f"{source}: row {ex.row}: field 'margin': missing; {cls.name} {why}")

    def loss(self, policy: PairLogps, ref: PairLogps | None, margin: Tensor | None = None) -> LossOutput:
        """``margin``: the pairs' ``margin`` column, (B,), passed to a loss that takes one (see ``needs_margin``)."""
        fn = type(self).loss_fn
        kwargs: dict[str, Any] = {
            "policy_chosen_logps": policy.chosen_logps,
            "policy_rejected_logps": policy.rejected_logps,
        }
        if self.needs_reference:
            if ref is None:
                raise ValueError(f"{self.name} needs reference log-probs; set reference.kind to copy or cached")
            kwargs.update(ref_chosen_logps=ref.chosen_logps, ref_rejected_logps=ref.rejected_logps)
        accepted = inspect.signature(fn).parameters
        for name in ("chosen_lengths", "rejected_lengths"):
            if name in accepted:
                kwargs[name] = getattr(policy, name)
        if self.needs_margin:
            if margin is None:
                raise ValueError(f"{self.name} needs each pair's reward margin (the data's margin column)")
            kwargs["margin"] = margin.to(policy.chosen_logps.device)
        kwargs.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return fn(**kwargs)


@dataclass(frozen=True)
class DPO(PreferenceAlgorithm):
    name: ClassVar[str] = "dpo"
    loss_fn = staticmethod(losses.dpo)
    beta: float = 0.1
    rpo_alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        check(self.rpo_alpha >= 0, "rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")


@dataclass(frozen=True)
class IPO(PreferenceAlgorithm):
    name: ClassVar[str] = "ipo"
    loss_fn = staticmethod(losses.ipo)
    beta: float = 0.1
    length_normalize: bool = False

    def __post_init__(self) -> None:
        _check_beta(self.beta)


@dataclass(frozen=True)
class Distill(PreferenceAlgorithm):
    name: ClassVar[str] = "distill"
    needs_margin: ClassVar[bool] = True
    loss_fn = staticmethod(losses.distill)
    beta: float = 0.1

    def __post_init__(self) -> None:
        _check_beta(self.beta)


@dataclass(frozen=True)
class CDPO(PreferenceAlgorithm):
    name: ClassVar[str] = "cdpo"
    loss_fn = staticmethod(losses.cdpo)
    beta: float = 0.1
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        eps = self.label_smoothing
        check(0 <= eps <= 0.5, "label_smoothing", f"must be in [0, 0.5], got {eps}")


@dataclass(frozen=True)
class RobustDPO(PreferenceAlgorithm):
    name: ClassVar[str] = "robust_dpo"
    loss_fn = staticmethod(losses.robust_dpo)
    beta: float = 0.1
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        eps = self.label_smoothing
        check(0 <= eps < 0.5, "label_smoothing", f"must be in [0, 0.5), got {eps}")


@dataclass(frozen=True)
class Hinge(PreferenceAlgorithm):
    name: ClassVar[str] = "hinge"
    loss_fn = staticmethod(losses.hinge)
    beta: float = 0.1

    def __post_init__(self) -> None:
        _check_beta(self.beta)


@dataclass(frozen=True)
class SimPO(PreferenceAlgorithm):
    name: ClassVar[str] = "simpo"
    needs_reference: ClassVar[bool] = False
    default_learning_rate: ClassVar[float] = 1e-6
    loss_fn = staticmethod(losses.simpo)
    beta: float = 2.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        check(self.gamma >= 0, "gamma", f"must be >= 0, got {self.gamma}")


@dataclass(frozen=True)
class ORPO(PreferenceAlgorithm):
    name: ClassVar[str] = "orpo"
    needs_reference: ClassVar[bool] = False
    default_learning_rate: ClassVar[float] = 8e-6
    loss_fn = staticmethod(losses.orpo)
    orpo_lambda: float = 0.1

    def __post_init__(self) -> None:
        check(self.orpo_lambda >= 0, "orpo_lambda", f"must be >= 0, got {self.orpo_lambda}")
