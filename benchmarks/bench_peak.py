"""The machine's matmul peak, the denominator of MFU: measured here (the CPU benchmark, after the load has
settled) or in a process of its own by child_peak.py (``--gpu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_runs import child_env
from bench_settings import Settings

HERE = Path(__file__).resolve().parent


def settle_load(limit: float = 0.5, wait_s: float = 120.0) -> float:
    """The 1-minute load average once it is below ``limit`` (it decays for a minute or two after earlier
    work), waiting at most ``wait_s`` seconds: the load the runs start under."""
    deadline = time.perf_counter() + wait_s
    while os.getloadavg()[0] > limit and time.perf_counter() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def measure_peak(threads: int, seconds: float, n: int, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Matmul peak (FLOP/s): the best of repeated bursts of four n x n torch.matmul calls, fp32 on ``threads``
    CPU threads by default; on a GPU the device is synchronised before and after each burst."""
    import torch

    torch.set_num_threads(threads)
    kind = torch.device(device)
    a, b = (torch.randn(n, n, device=kind, dtype=getattr(torch, dtype)) for _ in range(2))
    c = torch.empty_like(a)
    sync = torch.cuda.synchronize if kind.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best, deadline, bursts = 0.0, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or bursts < 3:
        sync()
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b, out=c)
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
        bursts += 1
    out: dict[str, Any] = {"flops": best, "n": n, "threads": threads, "seconds": seconds}
    if device != "cpu" or dtype != "float32":  # the CPU benchmark's JSON keeps its keys
        out.update(device=device, dtype=dtype)
    return out


def peak_in_child(s: Settings, work: Path, tag: str) -> dict[str, Any] | None:
    """--gpu: the bf16 matmul peak measured by child_peak.py in its own process (the training children are
    processes of their own too), with the device's name and memory and torch's CUDA version; None if it failed."""
    out = work / f"peak-{tag}.json"
    spec = {"threads": s.threads, "seconds": s.peak_seconds, "n": s.peak_n, "device": s.device, "dtype": "bfloat16",
            "result_file": str(out)}  # fmt: skip
    log = work / f"peak-{tag}.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "child_peak.py"), json.dumps(spec)], stdout=f,
                              stderr=subprocess.STDOUT, env=child_env(s, {}), timeout=300, check=False)  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        print(f"peak measurement failed (exit {proc.returncode}; log: {log})", flush=True)
        return None
    return json.loads(out.read_text())
