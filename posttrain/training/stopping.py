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
  what a shell or a scheduler reads as "ended by SIGTERM").

A stop takes the rest of the step in progress (an online step's sampling included) and the checkpoint's
write: a scheduler's grace period (Slurm's ``KillWait``, Kubernetes' ``terminationGracePeriodSeconds``) must
leave that much. SIGKILL still ends a run at once (it falls back on its last checkpoint); so does Ctrl-C
(SIGINT: the folder says ``failed``). SIGTERMs repeated before the stop (a scheduler and torchrun both pass it
on) are one request. A request that no step boundary served (it came during the last step, or while a run
that trains no more steps saved its model) raises :class:`Stopped` when the run's folder is released, the run
finished: a pipeline, iterative DPO's rounds or a frontier then ends there instead of starting the next stage,
round or run, which ``--resume`` starts. Only the main thread can install a handler: a run started in another
thread keeps SIGTERM's default.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor

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
    nested blocks share the outermost's handler. A block that ends without raising while a request is
    pending raises :class:`Stopped` (see the module docstring)."""
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
        if _received:
            raise Stopped(f"stopped by {Stopped.signal()} once {what} had finished; --resume starts what comes next")
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
            _received.clear()


def requested() -> int | None:
    """The signal that asked this process to stop (None: none did)."""
    return _received[0] if _received else None


def flag() -> Tensor:
    """This process's request as a host scalar, to be summed with a step's figures under :data:`FIGURE`."""
    return torch.tensor(1.0 if _received else 0.0, dtype=torch.float64)


class Stopped(Exception):
    """A run stopped on a signal: at a step boundary after writing the checkpoint it resumes from
    (:meth:`at_step`), or once a run had finished."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.signal_name, self.step = self.signal(), step

    @staticmethod
    def signal() -> str:
        """The name of the signal that asked to stop (SIGTERM)."""
        return signal.Signals(requested() or signal.SIGTERM).name

    @classmethod
    def at_step(cls, step: int, total: int, checkpoint: Path) -> Stopped:
        return cls(f"stopped by {cls.signal()} after step {step} of {total}; checkpoint {checkpoint}: continue the run "
                   "with --resume", step)  # fmt: skip


__all__ = ["EXIT_STATUS", "FIGURE", "Stopped", "flag", "requested", "watching"]
