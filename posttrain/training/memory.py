"""Peak memory of this process, as summary.json, metrics.jsonl and the progress bar report it.

``peak_rss_gb``: the host's peak resident set (``ru_maxrss``). Where the run's device is a CUDA GPU, also
``peak_gpu_allocated_gb`` (tensors: ``torch.cuda.max_memory_allocated``) and ``peak_gpu_reserved_gb`` (what
the caching allocator holds from the driver: ``max_memory_reserved``, what ``nvidia-smi`` sees of torch less
the CUDA context); on a CPU run the two keys are absent. All in GiB, peaks since the process started (a
pipeline's later stage or an iterative round includes the earlier ones, as RSS does).

Reading them is a query of the allocator's host-side counters: no device synchronisation, and the loops read
them once per logging step anyway.
"""

from __future__ import annotations

import resource

import torch


def peak_memory(device: torch.device) -> dict[str, float]:
    """``{"peak_rss_gb": ..., "peak_gpu_allocated_gb": ..., "peak_gpu_reserved_gb": ...}`` (the last two only
    when ``device`` is a CUDA device), GiB rounded to 0.01."""
    figures = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # Linux: KiB
    if device.type == "cuda":
        figures["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        figures["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return figures


def shown(figures: dict[str, float]) -> dict[str, str]:
    """The progress bar's part of :func:`peak_memory`'s figures: ``rss=1.23G gpu=13.60/14.10G`` (allocated /
    reserved)."""
    out = {"rss": f"{figures['peak_rss_gb']:.2f}G"} if "peak_rss_gb" in figures else {}
    if "peak_gpu_allocated_gb" in figures:
        out["gpu"] = f"{figures['peak_gpu_allocated_gb']:.2f}/{figures['peak_gpu_reserved_gb']:.2f}G"
    return out
