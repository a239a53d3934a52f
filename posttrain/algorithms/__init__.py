"""Algorithms: small frozen dataclasses binding a method's hyperparameters to its loss.

Each class declares what the loops must provide (a reference model? which kind of data?) and holds the
hyperparameters with the defaults of its paper. The config binds the YAML's top-level hyperparameter keys
(``beta``, ``gamma`` ...) to the fields of the chosen method's class. Adding a method means one loss in
``posttrain.losses``, one class here, one entry in ``ALGORITHMS`` and no change to a loop.
"""

from __future__ import annotations

import dataclasses

from posttrain.algorithms.base import Algorithm
from posttrain.algorithms.kto import KTO
from posttrain.algorithms.online import DAPO, GRPO, PPO, RLOO, DrGRPO, IterativeDPO, OnlineAlgorithm
from posttrain.algorithms.preference import (
    CDPO,
    DPO,
    IPO,
    ORPO,
    Distill,
    Hinge,
    PreferenceAlgorithm,
    RobustDPO,
    SimPO,
)
from posttrain.algorithms.reward import RewardModel
from posttrain.algorithms.sft import SFT

_OFFLINE = (DPO, IPO, CDPO, RobustDPO, Hinge, SimPO, ORPO, Distill, SFT, RewardModel, KTO)
_ONLINE = (GRPO, DrGRPO, DAPO, RLOO, PPO, IterativeDPO)
ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (*_OFFLINE, *_ONLINE)}


def hyperparameter_owners() -> dict[str, list[str]]:
    """Every hyperparameter key -> the methods that take it (to reject keys given to the wrong method)."""
    owners: dict[str, list[str]] = {}
    for name, cls in ALGORITHMS.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(name)
    return owners


__all__ = ["ALGORITHMS", "Algorithm", "OnlineAlgorithm", "PreferenceAlgorithm", "hyperparameter_owners"]
