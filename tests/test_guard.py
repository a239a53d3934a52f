"""The non-finite guard (posttrain/training/guard.py): a diverged run stops in one line and saves nothing after
the step; ``skip_nonfinite_steps`` skips such updates on the device instead, counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from support import first_bundled_pairs, run_config

import posttrain
from posttrain import distributed
from posttrain.training import offline, optim
from posttrain.training.guard import NonFiniteError


def test_a_diverging_run_stops_in_one_line_with_nothing_saved(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``learning_rate: 1e30`` (the issue's case): the loss turns non-finite after the first update. The CLI
    prints one line naming the step, the figure and the likely cause, exits 1, and writes no model."""
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    config = run_config("sft", tiny_model_dir, pairs, tmp_path / "out", max_steps=4, learning_rate=1e30)
    config["data"].pop("eval")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "posttrain", "train", str(path)], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("posttrain: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "the loss is nan" in errors[0] or "the loss is inf" in errors[0] or "gradient norm is" in errors[0]
    assert "learning_rate 1e+30 too high" in errors[0]
    assert not (tmp_path / "out" / "model").exists()
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(isinstance(x["loss"], float) for x in lines)  # only the finite steps were logged


def nan_norm_at(step: int, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Make the gradient norm of optimizer step ``step`` (1-based) NaN; return what each optimizer step left:
    a parameter's sum and AdamW's step count."""
    clip = distributed.clip_grad_norm
    calls = [0]

    def clip_then_poison(params: Any, max_norm: float) -> torch.Tensor:
        calls[0] += 1
        norm = clip(params, max_norm)
        return norm * float("nan") if calls[0] == step else norm

    after: list[dict[str, Any]] = []
    build = optim.build_optimizer

    def build_and_watch(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        opt = build(*args, **kwargs)
        p = opt.param_groups[0]["params"][0]

        def record(*_: Any) -> None:
            after.append({"sum": float(p.detach().double().sum()), "count": float(opt.state[p]["step"])})

        opt.register_step_post_hook(record)
        return opt

    monkeypatch.setattr(offline.distributed, "clip_grad_norm", clip_then_poison)
    monkeypatch.setattr(offline, "build_optimizer", build_and_watch)
    return after


def test_skipped_steps_leave_the_weights_on_the_device(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after = nan_norm_at(2, monkeypatch)
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    config = run_config("dpo", tiny_model_dir, pairs, tmp_path / "out", max_steps=4, skip_nonfinite_steps=1)
    config["data"].pop("eval")
    result = posttrain.train(config)
    assert result.summary["skipped_steps"] == 1
    assert after[1] == after[0]  # step 2: the weights and AdamW's step count untouched (the fused found_inf)
    assert after[2]["sum"] != after[1]["sum"] and after[3]["count"] == 3.0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped", False) for x in lines if x["split"] == "train"] == [False, True, False, False]
    assert (tmp_path / "out" / "model").is_dir()


def test_without_skips_the_first_nonfinite_step_stops(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_norm_at(2, monkeypatch)
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    config = run_config("dpo", tiny_model_dir, pairs, tmp_path / "out", max_steps=4)
    config["data"].pop("eval")
    with pytest.raises(NonFiniteError, match=r"^step 2: the gradient norm is nan .*learning_rate 0\.003 too high"):
        posttrain.train(config)
    assert not (tmp_path / "out" / "model").exists()


def test_a_saturated_model_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    from posttrain.training.guard import NonFiniteGuard

    guard = NonFiniteGuard([], 0, 1e6)
    assert guard.saturated(0.0) and not guard.saturated(0.0) and not guard.saturated(0.5)
