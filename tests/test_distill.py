"""Reward distillation (``distill``): the loss by hand, its minimiser, and runs that train on pairs' margins,
offline and each round of iterative DPO.

Notation as in posttrain/losses/preference.py: h = (pc - rc) - (pr - rr), m the pair's reward margin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

import pytest
import torch
from support import run_config
from test_iterative import factory, two_rounds

from posttrain.algorithms.preference import Distill
from posttrain.config import load
from posttrain.losses import distill, ipo
from posttrain.model.logps import PairLogps
from posttrain.training.iterative import run_iterative
from posttrain.training.metrics import read_metrics
from posttrain.training.offline import run

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


class Four(TypedDict):
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor


def four(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> Four:
    return Four(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr)


def test_values_gradients_and_metrics_by_hand() -> None:
    """Pair 0: pc=-1, pr=-3, rc=-2, rr=-2.5 -> h = 1.5; pair 1: pc=-4, pr=-2, rc=-3, rr=-3 -> h = -2.
    beta = 0.5, m = (1, -0.5): beta * h = (0.75, -1), loss = (0.75 - 1)^2, (-1 + 0.5)^2 = (0.0625, 0.25);
    d loss / d pc = 2 (beta h - m) beta = (-0.25, -0.5), d loss / d pr its negative."""
    pc, pr = t(-1.0, -4.0).requires_grad_(), t(-3.0, -2.0).requires_grad_()
    out = distill(**four(pc, pr, t(-2.0, -3.0), t(-2.5, -3.0)), margin=t(1.0, -0.5), beta=0.5)
    torch.testing.assert_close(out.loss, t(0.0625, 0.25), rtol=1e-12, atol=0.0)
    out.loss.sum().backward()
    assert pc.grad is not None and pr.grad is not None
    torch.testing.assert_close(pc.grad, t(-0.25, -0.5), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(pr.grad, t(0.25, 0.5), rtol=1e-12, atol=0.0)
    m = out.metrics
    torch.testing.assert_close(m["chosen_rewards"], t(0.5, -0.5), rtol=1e-12, atol=0.0)  # 0.5 * (pc - rc)
    torch.testing.assert_close(m["margins"], t(0.75, -1.0), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(m["target_margin"], t(1.0, -0.5), rtol=1e-12, atol=0.0)
    assert m["accuracy"].tolist() == [1.0, 0.0]


def test_zero_at_the_kl_regularised_optimum_and_ipo_with_one_target() -> None:
    """log pi = log pi_ref + r / beta - log Z (the DPO paper's Eq. 4) gives every pair, whichever two answers
    it holds, a loss of 0. With m = 1 / 2 for every pair, (beta h - 1 / 2)^2 = beta^2 (h - 1 / (2 beta))^2:
    IPO's loss times beta^2."""
    g = torch.Generator().manual_seed(0)
    ref, reward, beta = torch.randn(6, generator=g, dtype=F64), torch.rand(6, generator=g, dtype=F64), 0.2
    logz = torch.logsumexp(ref + reward / beta, 0)
    policy = ref + reward / beta - logz
    i, j = torch.tensor([0, 1, 2, 3, 5]), torch.tensor([4, 0, 5, 1, 2])
    out = distill(**four(policy[i], policy[j], ref[i], ref[j]), margin=reward[i] - reward[j], beta=beta)
    torch.testing.assert_close(out.loss, torch.zeros(5, dtype=F64), rtol=0.0, atol=1e-12)
    logps = four(t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -3.0), t(-2.5, -3.0))
    half = distill(**logps, margin=t(0.5, 0.5), beta=beta).loss
    torch.testing.assert_close(half, beta**2 * ipo(**logps, beta=beta).loss, rtol=1e-12, atol=0.0)


def test_the_algorithm_passes_the_margin_and_needs_one() -> None:
    pair = PairLogps(t(-1.0), t(-3.0), t(1.0), t(1.0))
    ref = PairLogps(t(-2.0), t(-2.5), t(1.0), t(1.0))
    assert Distill(beta=0.5).loss(pair, ref, t(1.0)).loss.item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="distill needs each pair's reward margin"):
        Distill(beta=0.5).loss(pair, ref)
    raw = {"method": "distill", "model": "m", "output_dir": "o", "data": {"train": "d.jsonl"}, "beta": 0.3}
    assert load(raw).algorithm == Distill(0.3)


def test_an_offline_run_fits_the_margins(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Pairs whose margins differ in sign and size: the implicit margins move towards them (the loss falls,
    and each pair's margin moves the way its target asks)."""
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}", "rejected": f" {i + 2}", "margin": m}
            for i, m in enumerate([1.0, 0.5, -0.5, 2.0] * 2)]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(run_config("distill", tiny_model_dir, data, tmp_path / "run", beta=0.5, learning_rate=1e-3))
    metrics = read_metrics(result.output_dir / "metrics.jsonl")
    evals = [m for m in metrics if m["split"] == "eval"]
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"], evals
    assert evals[-1]["target_margin"] == pytest.approx(0.75)  # the mean of the 8 margins


def test_iterative_rounds_write_margins_and_train_distill(tiny_model_dir: Path, tmp_path: Path) -> None:
    config: dict[str, Any] = two_rounds(tiny_model_dir, tmp_path, "it", loss="distill", beta=0.5)
    result = run_iterative(load(config), generator_factory=factory)
    for r in (1, 2):
        rows = [json.loads(line) for line in (tmp_path / "it" / f"round-{r}" / "pairs.jsonl").read_text().splitlines()]
        assert rows and all(row["margin"] == row["score_chosen"] - row["score_rejected"] > 0 for row in rows)
        train = read_metrics(tmp_path / "it" / f"round-{r}" / "train" / "metrics.jsonl")
        assert [m["step"] for m in train if m["split"] == "train"] == [1, 2]
        assert all(m["target_margin"] > 0 for m in train if m["split"] == "train")
    assert load(tmp_path / "it" / "round-2" / "train" / "config.yaml").algorithm == Distill(0.5)
    assert (result.model_dir / "config.json").exists()
