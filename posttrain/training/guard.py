"""The non-finite guard: a NaN or infinite loss or gradient norm stops the run at that step, in one line.

Without it a diverged run (``learning_rate: 1e30``) trains on NaN, exits 0 and saves a model of NaN tensors.
The guard rides on the one device read of each optimizer step (the loss and the gradient norm are read
with the step's other figures, :meth:`posttrain.training.metrics.MetricSums.mean`), so it costs no
synchronisation:

* ``skip_nonfinite_steps: 0`` (the default): the first non-finite step raises :class:`NonFiniteError`; the
  loop has not saved anything after it, so the folder keeps the last good checkpoint and no final model.
* ``skip_nonfinite_steps: N``: the update of a step whose gradient norm is not finite is skipped ON THE
  DEVICE, before anything is read, as a gradient scaler does (the fused AdamW takes a ``found_inf`` flag and
  leaves the weights, its moments and its step count alone); up to N such steps are skipped and counted in
  the summary (``skipped_steps``), the next one stops the run. The learning-rate schedule moves on.
  Optimizers without the flag (the per-tensor AdamW of float64 models) read the norm first: one more read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class NonFiniteError(RuntimeError):
    """Training met a NaN or infinite loss or gradient norm; the message is one line, for the CLI."""


class NonFiniteGuard:
    """Watches the optimizers of a run: :meth:`before_step` (device side) and :meth:`check` (after the step's read)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], skips_allowed: int, learning_rate: float) -> None:
        self.optimizers = optimizers  # (PPO: the policy's and the critic's, skipped together)
        self.skips_allowed = skips_allowed
        self.learning_rate = learning_rate
        self.skipped = 0
        self.warned_zero = False
        self.on_device = all(group.get("fused") for opt in optimizers for group in opt.param_groups)

    def before_step(self, grad_norm: Tensor) -> bool:
        """Arrange for the coming ``optimizer.step()`` to skip a non-finite update; returns False when the step
        must not run at all (a host-checked skip)."""
        if not self.skips_allowed:
            return True
        if self.on_device:
            found_inf = (~torch.isfinite(grad_norm)).float().reshape(())
            for opt in self.optimizers:
                opt.found_inf = found_inf  # type: ignore[attr-defined]
            return True
        return bool(torch.isfinite(grad_norm))  # the one extra read of optimizers without the flag

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """After the step's read: raise :class:`NonFiniteError`, or count a skipped step (returns True)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        if self.skipped < self.skips_allowed and not math.isfinite(grad_norm):
            self.skipped += 1
            return True
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise NonFiniteError(
            f"step {step}: the {what} is {loss if what == 'loss' else grad_norm} (loss {loss}, grad norm {grad_norm}); "
            f"training diverged, so nothing after the last checkpoint is saved. Likely cause: learning_rate "
            f"{self.learning_rate:g} too high for this model, or a bad example in this step's batch"
            + (f" (skip_nonfinite_steps: {self.skips_allowed} used up)" if self.skips_allowed else "")
        )

    def saturated(self, grad_norm: float) -> bool:
        """True the first time the gradient norm is exactly 0 (a saturated model, e.g. a huge learning rate)."""
        if grad_norm == 0.0 and not self.warned_zero:
            self.warned_zero = True
            return True
        return False


__all__ = ["NonFiniteError", "NonFiniteGuard"]
