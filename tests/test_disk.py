"""The disk-space estimate a run says before it writes (posttrain.training.disk): the bytes by hand for a
110-parameter model, and the one warning line of a run whose disk is too small (the run still trains); an
online checkpoint's state the size the estimate counts (the policy's optimizer state once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from support import first_bundled_pairs, run_config, write_word_prompts

import posttrain
from posttrain.training import disk


def linear() -> torch.nn.Linear:
    return torch.nn.Linear(10, 10)  # 110 float32 parameters: 440 bytes


def test_the_bytes_by_hand() -> None:
    model = linear()
    # save_steps 2 of 6 steps: checkpoints at 2, 4 and the end state (its weights the final model's): 440 for the
    # final model + 2 x 440 + 3 states of 2 x 440.
    assert disk.needs(model, None, 2, None, 0, 6, False, False).total == 440 + 2 * 440 + 3 * 880
    assert disk.needs(model, None, 2, 1, 0, 6, False, False).total == 440 + 2 * 440 + 2 * 880  # one kept, +1 writing
    assert disk.needs(model, None, None, None, 0, 6, False, False).total == 440  # no checkpoints
    assert disk.needs(model, None, 2, None, 4, 6, False, False).total == 440 + 880  # resumed at 4: the end state
    model.weight.requires_grad_(False)  # "adapters": the bias alone, 40 bytes
    assert disk.needs(model, None, 2, None, 0, 6, True, False).total == 440 + 2 * 40 + 3 * 80  # merged final
    assert disk.needs(model, None, 2, None, 0, 6, True, True).total == 40 + 2 * 40 + 3 * 80  # adapters saved
    critic = torch.nn.Linear(10, 1)  # 44 bytes: its weights and moments in every state, critic/ at the end
    both = disk.needs(linear(), critic, 2, None, 0, 6, False, False)
    assert both.total == 440 + 44 + 2 * 440 + 3 * (880 + 44 + 88)
    assert both.describe() == ("3 checkpoints of 0.00 GB, 3 of them with their 0.00 GB training state, and the "
                               "final model, 0.00 GB")  # fmt: skip


@pytest.mark.parametrize("free", [10**15, 1000])
def test_a_run_warns_when_its_disk_is_too_small(
    free: int, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Usage:
        def __init__(self, path: Any) -> None:
            self.free = free

    monkeypatch.setattr(disk.shutil, "disk_usage", Usage)
    out = tmp_path / "run"
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl")
    posttrain.train(run_config("dpo", tiny_model_dir, pairs, out, max_steps=2, save_steps=1))
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning: output_dir" in line]
    if free > 1000:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(
            f"posttrain: warning: output_dir: {out}: this run will write about "
        )
        assert (
            "(2 checkpoints of " in lines[0]
            and "its disk has 0.0 GB free; the write that fills it will fail" in lines[0]
        )
    assert (out / "model" / "model.safetensors").exists()  # a warning, not a refusal


def test_an_online_checkpoint_holds_the_policy_optimizer_state_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A GRPO checkpoint's training state is AdamW's two moments of the policy (2x its weights; it held
    them twice, 4x, until 2026-12-07), and a checkpoint of the older layout still resumes to the same run."""
    from safetensors.torch import load_file
    from test_online import CANDIDATES, online_config

    from posttrain.config import load
    from posttrain.rollout.generate import ScriptedGenerator
    from posttrain.training import checkpoint
    from posttrain.training.metrics import read_metrics
    from posttrain.training.online import run_online

    prompts = write_word_prompts(tmp_path / "prompts.jsonl", 8)

    def train(out: Path, resume: bool = False) -> list[tuple[int, float]]:
        cfg = load(online_config("grpo", tiny_model_dir, prompts, out, max_steps=4, save_steps=2))
        result = run_online(cfg, resume, lambda m, t: ScriptedGenerator(t, CANDIDATES, score_model=m))
        return [(m["step"], m["loss"]) for m in read_metrics(result.metrics_path) if m["split"] == "train"]

    straight = train(tmp_path / "straight")
    step2 = tmp_path / "straight" / "checkpoints" / "step-000002"
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors.values())  # noqa: E731
    weights, state = (
        size(load_file(str(step2 / "model.safetensors"))),
        size(load_file(str(step2 / checkpoint.TENSORS_FILE))),
    )
    assert 2 * weights <= state < 2.05 * weights
    # The older layout: the policy's optimizer state in "optimizers" too; resumed from step 2, the same run.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "straight", old)
    shutil.rmtree(old / "checkpoints" / "step-000004")
    (old / "model").rename(tmp_path / "old-model")
    (old / "summary.json").unlink()
    ckpt = old / "checkpoints" / "step-000002"
    saved = checkpoint.load_state(ckpt)
    saved["optimizers"][0] = (saved["optimizer"], saved["optimizers"][0][1])
    for name in (checkpoint.STATE_FILE, checkpoint.TENSORS_FILE):
        (ckpt / name).unlink()
    checkpoint.save_state(ckpt, saved)
    rundir_state = json.loads((old / "run_state.json").read_text())
    (old / "run_state.json").write_text(json.dumps({**rundir_state, "state": "running", "pid": 1}))
    assert train(old, resume=True) == straight
