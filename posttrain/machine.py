"""What measured a figure: the device, the CPU, the thread count and torch's version.

The same model, seed and prompts sample different completions on another machine (its BLAS and thread count
change the order of floating-point sums, and one flipped token changes every token after it), so a figure
is only comparable with figures measured on the same machine. The frontier records this beside every point
it measures (:mod:`posttrain.frontier.points`); the benchmarks print it beside their tables.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what :mod:`platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict[str, str | int]:
    """The machine as a record: ``device`` (``cpu`` or the accelerator's name), ``cpu``, ``cpus`` (logical),
    ``threads`` (torch's intra-op threads) and ``torch`` (its version)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": name, "cpu": cpu_model(), "cpus": os.cpu_count() or 0, "threads": torch.get_num_threads(),
            "torch": torch.__version__}  # fmt: skip


def summary(record: dict[str, str | int]) -> str:
    """One line: ``cpu (Intel ...), 2 logical CPUs, 2 threads, torch 2.9.0``."""
    return (f"{record.get('device', '?')} ({record.get('cpu', '?')}), {record.get('cpus', '?')} logical CPUs, "
            f"{record.get('threads', '?')} threads, torch {record.get('torch', '?')}")  # fmt: skip


__all__ = ["cpu_model", "describe", "summary"]
