"""A graceful stop: SIGTERM ends a run at the next optimizer step, with a checkpoint that ``--resume`` continues.

SIGTERM is how a run's time ends on the machines people rent: Slurm at a job's time limit (``#SBATCH
--signal=TERM@120`` sends it two minutes early), Kubernetes when it evicts a pod, a cloud when it reclaims a
spot instance, ``kill``, and torchrun passing any of these on to its processes. Python's default is to die at
once, losing every step since the last checkpoint. While a run holds its folder
(:func:`posttrain.training.rundir.claim` and :func:`~posttrain.training.rundir.locked` enter :func:`watching`),
SIGTERM only raises a flag instead:

* the training loops carry the flag in each optimizer step's one device-to-host read (:data:`FIGURE`, summed
  over the processes of a torchrun job, so that all of them stop at the same step; no read of its own);
* at the end of the step that reads it, the loop writes a resumable checkpoint of that step (whatever
  ``save_steps`` says: the model, the optimizer and the RNG) and raises :class:`Stopped`;
* the folder's ``run_state.json`` says ``stopped`` (with the signal and the step); ``posttrain train CONFIG
  --resume`` continues the run from that checkpoint, a plain start is refused as for any resumable run;
* the command line prints one line naming the step and the checkpoint, and exits with status 143 (128 + 15,
  what a shell or a scheduler reads as "ended by SIGTERM");
* the checkpoint is marked as a stop's (:data:`posttrain.training.checkpoint.STOP_MARK`): the resumed run
  evaluates first where the stopped step was an ``eval_steps`` step, and removes it once it has finished,
  so that the folder holds what an uninterrupted run's holds (no frontier point of its own, no optimizer
  state left in a run without ``save_steps``).

A stop takes the rest of the step in progress (an online step's sampling included) and the checkpoint's write:
a scheduler's grace period (Slurm's ``KillWait``, Kubernetes' ``terminationGracePeriodSeconds``, and under
torchrun its own ``--shutdown-timeout``, 30 s unless set) must leave that much. SIGKILL still ends a run at
once (it falls back on its last checkpoint); so does Ctrl-C (SIGINT: the folder says ``failed``). SIGTERMs
repeated before the stop (a scheduler and torchrun both pass it on) are one request. A request that no step
boundary served (it came during the last step, or while a run saved its final model) lets the run finish: a
pipeline's stage or an iterative DPO round then raises :class:`Stopped` once its folder says finished, so that
the pipeline, the rounds or a frontier start nothing more (``--resume`` goes on from there); a run of its own
says so and ends as usual. A request that comes between a pipeline's stages or while iterative DPO samples a
round stops it before the next training (:func:`agreed`: every process of a job decides alike). Only the main
thread can install a handler: a run started in another thread keeps SIGTERM's default.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

FIGURE = "stop_requested"
"""The name under which the flag travels with a step's figures (summed: > 0 when any process was signalled)."""

EXIT_STATUS = 128 + signal.SIGTERM
"""The command line's exit status after a stop."""

_received: list[int] = []  # the signals received while watching
_depth = 0  # nested watching() blocks (a pipeline's root, then its stage's folder)
_previous: Any = None  # the handler watching() replaced


def _note(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


@contextlib.contextmanager
def watching(what: str) -> Iterator[None]:
    """Turn SIGTERM into a request (:func:`requested`) for the block, ``what`` it holds (a run's folder);
    nested blocks share the outermost's handler. A request still pending when a block ends without raising
    (it came in the last step): a nested block (a pipeline's stage, iterative DPO's round) raises
    :class:`Stopped`, so that what holds it starts nothing more; the outermost one says so and returns, its
    run finished (see the module docstring)."""
    global _depth, _previous
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received.clear()
        _previous = signal.signal(signal.SIGTERM, _note)
    _depth += 1
    try:
        yield
        if _depth > 1 and agreed():
            raise Stopped(f"stopped by {Stopped.signal()} once {what} had finished; --resume goes on from there")
        if _depth == 1 and _received:
            tqdm.write(f"posttrain: {Stopped.signal()} came during the last step; {what} finished", file=sys.stderr)
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
            _received.clear()


def requested() -> int | None:
    """The signal that asked this process to stop (None: none did)."""
    return _received[0] if _received else None


def agreed() -> bool:
    """Whether any process of the job was asked to stop: outside the training steps (between a pipeline's
    stages, iterative DPO's rounds), where every process calls it at the same point (a collective)."""
    from posttrain import distributed

    if not distributed.is_initialized():
        return bool(_received)
    return distributed.sum_floats([1.0 if _received else 0.0])[0] > 0


def flag() -> Tensor:
    """This process's request as a host scalar, to be summed with a step's figures under :data:`FIGURE`."""
    return torch.tensor(1.0 if _received else 0.0, dtype=torch.float64)


class Stopped(Exception):
    """A run stopped on a signal: at a step boundary after writing the checkpoint it resumes from
    (:meth:`at_step`), or once a run had finished."""

    def __init__(self, message: str, checkpoint: Path | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.signal_name, self.checkpoint, self.step = self.signal(), checkpoint, step

    @staticmethod
    def signal() -> str:
        """The name of the signal that asked to stop (SIGTERM)."""
        return signal.Signals(requested() or signal.SIGTERM).name

    @classmethod
    def at_step(cls, step: int, total: int, checkpoint: Path) -> Stopped:
        return cls(f"stopped by {cls.signal()} after step {step} of {total}; checkpoint {checkpoint}: continue the run "
                   "with --resume", checkpoint, step)  # fmt: skip


__all__ = ["EXIT_STATUS", "FIGURE", "Stopped", "agreed", "flag", "requested", "watching"]
