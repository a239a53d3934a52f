"""What both training children measure the same way in ``run.py --gpu``: step ends on a synchronised clock and
the process's peak accelerator memory. Neither tool's own step time is used there: on a GPU the host runs
ahead of the device, and each tool syncs (reads its figures) at a different point of its step.

This module does not import TRL.
"""

from __future__ import annotations

import time
from typing import Any


def step_clock() -> list[float]:
    """Start recording ``time.perf_counter()`` after every optimizer step of this process, the device
    synchronised first (when CUDA is in use), so that an interval between two step ends is the whole step:
    batch assembly, forwards, backward, optimizer, logging. A global post-hook of ``torch.optim`` fires for
    every optimizer instance; only torch's own classes are counted (accelerate's wrapper of TRL's optimizer
    is a ``torch.optim.Optimizer`` subclass too, and must not count twice). Returns the list that fills up."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    ends: list[float] = []

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        if not type(optimizer).__module__.startswith("torch.optim"):
            return
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    register_optimizer_step_post_hook(after_step)
    return ends


def step_times(ends: list[float], start: float, total: int) -> list[float] | None:
    """Per-step wall times from the step ends (the first from ``start``, the warm-up that run.py leaves out);
    None when the clock did not see exactly ``total`` optimizer steps."""
    if len(ends) != total:
        return None
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]


def device_peaks() -> dict[str, Any]:
    """Peak CUDA memory of this process (bytes, allocated by tensors and reserved by the caching allocator)
    and the device's name; empty when CUDA was not used."""
    import torch

    if not torch.cuda.is_initialized():
        return {}
    return {
        "cuda_peak_allocated": torch.cuda.max_memory_allocated(),
        "cuda_peak_reserved": torch.cuda.max_memory_reserved(),
        "device_name": torch.cuda.get_device_name(),
    }


def gpu_figures(spec: dict[str, Any], ends: list[float], start: float, reported: list[float]) -> dict[str, Any]:
    """The figures a child adds in --gpu mode: the synchronised step times replace the tool's own (kept as
    ``reported_step_times``) when the clock saw every step, and the peak device memory."""
    total = spec["warmup"] + spec["steps"]
    synced = step_times(ends, start, total)
    out: dict[str, Any] = {"reported_step_times": reported, "step_clock": "synchronised" if synced else "tool"}
    out["step_times"] = synced if synced is not None else reported
    out["optimizer_steps_seen"] = len(ends)
    return {**out, **device_peaks()}
