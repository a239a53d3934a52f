"""Checkpoints: HF-format models (loadable with no posttrain import) and the resumable training state.

Layout of ``output_dir``::

    model/                      the final model and tokenizer (safetensors)
    checkpoints/step-000020/    a model + tokenizer, and trainer_state.pt (optimizer, scheduler, RNG, step)
    metrics.jsonl  config.yaml  summary.json

The layout does not depend on the number of processes: the first process writes full (unsharded) models
and optimizer state, so a run saved by N processes resumes on M (docs/distributed.md).

Every directory is written under a temporary name and renamed when complete, so a run killed mid-save
never leaves a checkpoint that ``--resume`` would pick up half written.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target`` (replacing an older one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_model(model: Any, tokenizer: Any, target: Path) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write_atomically(target, write)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    extra: dict[str, Any],
) -> Path:
    """Model, tokenizer and the full training state after ``step`` optimizer steps.

    ``optimizer_state``: the FULL state in torch's layout (:func:`posttrain.distributed.optimizer_state`),
    whatever the number of processes that trained: any number can resume it. Written by one process."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            **rng_state(),
            **extra,
        }
        torch.save(state, tmp / STATE_FILE)

    return write_atomically(output_dir / "checkpoints" / f"step-{step:06d}", write)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The completed checkpoint with the highest step, or None."""
    root = output_dir / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.is_dir() else []
    return done[-1] if done else None


def load_state(checkpoint: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(checkpoint / STATE_FILE, weights_only=False)
    return state


def rng_state() -> dict[str, Any]:
    """The generators a resumed run continues from: torch's CPU one, Python's, and, once this process has used
    CUDA, every visible GPU's (``cuda``: a list of uint8 tensors, ``torch.cuda.get_rng_state_all``)."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_initialized():  # (asking an unused CUDA for its state would start it)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back :func:`rng_state`'s generators. CUDA states go to the GPUs this process sees (the first ones
    when it sees fewer than the saving process); a checkpoint without them (written on a CPU) leaves the GPUs'
    generators as the run's seed set them. With several processes every process takes the first one's states,
    as it does for the CPU generator."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(cuda)[: torch.cuda.device_count()])
