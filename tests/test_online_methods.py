"""The online-method seam (issue 16): a new method is one algorithm class and one method class, and the loop
(posttrain.training.online.run_online) runs it unchanged. Measured with REINFORCE and a batch-mean baseline:
the algorithm class is 4 lines, the method class 10, plus one entry in each registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from support import write_word_prompts
from torch import Tensor

from posttrain import algorithms
from posttrain.algorithms.online import GRPO, OnlineAlgorithm
from posttrain.config import load
from posttrain.model.logps import TokenLogps
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training import online_methods
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online
from posttrain.training.online_methods import Counts, OnlineMethod, Targets, rloo_loss_of


@dataclass(frozen=True)
class Reinforce(OnlineAlgorithm):
    name: ClassVar[str] = "reinforce"
    beta: float = 0.0  # no KL term: no reference


class ReinforceMethod(OnlineMethod):
    """REINFORCE with the batch's mean reward as its baseline: A_i = r_i - mean(r), loss -A_i log pi(y_i|x)."""

    def targets(
        self, s: Any, old: Tensor | None, ref: Tensor | None, old_values: Tensor | None, tokens: int
    ) -> Targets:
        return Targets(s.rewards - s.rewards.mean(), old, ref)

    def loss(
        self, cur: TokenLogps, rows: Tensor, t: Targets, counts: Counts, values: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return rloo_loss_of(cur, t.advantages[rows].to(cur.sums.device), counts)


@pytest.fixture
def reinforce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(algorithms.ALGORITHMS, "reinforce", Reinforce)
    monkeypatch.setitem(online_methods.METHODS, Reinforce, ReinforceMethod)


def test_the_targets_are_the_batch_mean_baseline(reinforce: None) -> None:
    method = ReinforceMethod(Reinforce(num_generations=2), load({"method": "reinforce", "model": "m",
                             "output_dir": "out", "data": {"train": "p.jsonl"}}))  # fmt: skip
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # mean 2/3
    t = method.targets(SimpleNamespace(rewards=rewards), None, None, None, tokens=6)
    assert t.advantages.tolist() == pytest.approx([1 / 3, -2 / 3, -2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert (method.passes, method.minibatches, method.needs_old(reference=False)) == (1, 1, False)


def test_a_new_method_runs_through_the_loop_unchanged(reinforce: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    write_word_prompts(prompts, 8)
    config = load({
        "method": "reinforce", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
        "data": {"train": str(prompts), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 2, "batch_size": 4, "max_steps": 2, "learning_rate": 1e-3,
    })  # fmt: skip
    assert isinstance(online_methods.online_method(config), ReinforceMethod)
    result = run_online(config, generator_factory=lambda m, t: ScriptedGenerator(t, ["yes", "no"], score_model=m))
    train = [row for row in read_metrics(result.metrics_path) if row["split"] == "train"]
    assert [row["step"] for row in train] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in train)
    assert "kl" not in train[0] and "clip_low" not in train[0]  # no reference, no ratio: figures of its own only


def test_presets_take_their_base_method() -> None:
    """DAPO and Dr. GRPO are GRPO with other defaults: they run GRPO's method class."""
    for name in ("grpo", "dr_grpo", "dapo"):
        config = load({"method": name, "model": "m", "output_dir": "out", "data": {"train": "p.jsonl"}})
        assert isinstance(config.algorithm, GRPO)
        assert type(online_methods.online_method(config)) is online_methods.GRPOMethod
