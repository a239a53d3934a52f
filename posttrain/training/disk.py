"""Disk space, said before a run writes: what its checkpoints and final model will take against what is free.

A checkpoint that does not fit fails hours into a run (the write is retried, then the run stops:
:func:`posttrain.training.checkpoint.retried`), and a grid of runs fills a disk checkpoint by checkpoint. So a
run estimates, once it has built its models and knows its start, the bytes it will still write under
``output_dir``, and warns in one line when the disk has fewer free. The estimate, from the models in memory:

* a checkpoint's weights: every parameter of the policy (the adapters alone with LoRA), at its dtype's size;
* its training state: AdamW's two moments of every trained parameter (PPO's critic: its weights and moments);
* the checkpoints still to write (every ``save_steps`` after the start, and the end state, whose weights are
  the final model's: stored once), of which ``keep_resumable`` keep their state (one more while the newest is
  written, before the oldest is slimmed);
* the final model (the merged weights with LoRA, unless ``lora.save: adapter``), and PPO's ``critic/``.

Not counted: metrics, the reference cache, tokenizer files (kilobytes to megabytes), what the folder holds
already. A warning, not a refusal: space may be freed while the run trains, and the estimate is an estimate.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from tqdm import tqdm

from posttrain import distributed
from posttrain.config import TrainConfig
from posttrain.model.lora import is_lora


def _bytes(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass(frozen=True)
class Needs:
    """What a run will still write, in bytes (see the module docstring)."""

    checkpoints: int
    weights: int
    """of one checkpoint"""
    state: int
    """of one checkpoint that keeps its training state"""
    with_state: int
    """checkpoints that hold their state at once, at most"""
    final: int

    @property
    def total(self) -> int:
        return self.final + max(0, self.checkpoints - 1) * self.weights + self.with_state * self.state

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        if not self.checkpoints:
            return f"the final model, {gb(self.final)}"
        return (f"{self.checkpoints} checkpoints of {gb(self.weights)}, {self.with_state} of them with their "
                f"{gb(self.state)} training state, and the final model, {gb(self.final)}")  # fmt: skip


def needs(
    policy: nn.Module, critic: nn.Module | None, save_steps: int | None, keep_resumable: int | None,
    start: int, total: int, lora: bool, adapter_only: bool,
) -> Needs:  # fmt: skip
    """The bytes of a run of ``total`` optimizer steps from step ``start`` (``lora``: the policy carries
    adapters; ``adapter_only``: its final save is the adapters)."""
    params = list(policy.parameters())
    trained = [p for p in params if p.requires_grad]
    weights = _bytes(trained) if lora else _bytes(params)
    state = 2 * _bytes(trained)  # AdamW: exp_avg and exp_avg_sq, each like its parameter
    if critic is not None:
        critic_trained = [p for p in critic.parameters() if p.requires_grad]
        state += _bytes(critic.parameters()) + 2 * _bytes(critic_trained)
    saves = [k for k in range(start + 1, total) if save_steps and k % save_steps == 0]
    checkpoints = len(saves) + 1 if save_steps else 0  # (+ the end state)
    with_state = checkpoints if keep_resumable is None else min(checkpoints, keep_resumable + 1)
    final = _bytes(trained) if (lora and adapter_only) else _bytes(params)
    if critic is not None:
        final += _bytes(critic.parameters())  # (critic/, beside model/)
    return Needs(checkpoints, weights, state, with_state, final)


def check(
    config: TrainConfig, output_dir: Path, policy: nn.Module, critic: nn.Module | None, start: int, total: int
) -> bool:
    """The run's :func:`needs` against its disk (:func:`warn_if_short`, on stderr), by the first process."""
    if not distributed.is_main():
        return False
    adapter_only = config.lora is not None and config.lora.save == "adapter"
    needed = needs(policy, critic, config.save_steps, config.keep_resumable, start, total, is_lora(policy),
                   adapter_only)  # fmt: skip
    return warn_if_short(output_dir, needed, lambda line: tqdm.write(line, file=sys.stderr))


def warn_if_short(output_dir: Path, needed: Needs, log: Callable[[str], None]) -> bool:
    """One warning line when ``output_dir``'s disk has less free than ``needed``; whether it warned."""
    free = shutil.disk_usage(output_dir).free
    if needed.total <= free:
        return False
    log(
        f"posttrain: warning: output_dir: {output_dir}: this run will write about {needed.total / 1e9:.1f} GB "
        f"({needed.describe()}) and its disk has {free / 1e9:.1f} GB free; the write that fills it will fail and "
        "stop the run: free space, or write fewer checkpoints (save_steps, keep_resumable)"
    )
    return True


__all__ = ["Needs", "check", "needs", "warn_if_short"]
