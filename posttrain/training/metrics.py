"""Per-step metrics: summed with the same global counts as the loss, written as JSON lines."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain import distributed
from posttrain.host import to_device

TOKENS = "_tokens"
"""The name under which the loops sum the step's tokens (``per="total"``: not divided by a count)."""


class MetricSums:
    """Sums of per-example (or per-token) metrics over the micro-batches and processes of one step.

    ``mean(counts)`` divides each sum by the global count of its unit (``examples`` unless ``add`` says
    ``per="tokens"``; ``per="total"`` is a plain sum): micro-batching and sharding give the same figures as one
    big batch.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Tensor] = {}
        self._per: dict[str, str] = {}

    def add(self, name: str, values: Tensor, per: str = "examples") -> None:
        value = values.detach().double().sum()
        self._pending[name] = self._pending[name] + value if name in self._pending else value
        self._per[name] = per

    def mean(self, counts: Any = None, extra: dict[str, Tensor] | None = None) -> dict[str, float]:
        """``counts`` has ``of(unit) -> int`` (a :class:`~posttrain.training.task.Counts`; None when every
        figure was added ``per="total"``).

        ``extra``: scalars that are already global (the gradient norm, a non-finite flag), read in the same
        transfer and returned as they are. The sums and ``extra`` reach the host in ONE device-to-host read:
        the one read of an optimizer step (tests/test_syncs.py).
        """
        per = self._per
        if distributed.is_initialized():  # a process whose share added nothing still sums the same names
            per = {k: v for shown in distributed.all_gather_objects(self._per) for k, v in shown.items()}
        names = sorted(per)
        device = distributed.device()
        zero = torch.zeros((), dtype=torch.float64, device=device)
        parts = []
        if names:
            sums = torch.stack([to_device(self._pending.get(n, zero), device) for n in names])  # (host figures too)
            parts.append(distributed.all_reduce_sum(sums))
        extra = extra or {}
        if extra:
            scalars = [v.detach().to(device=device, dtype=torch.float64).reshape(()) for v in extra.values()]
            parts.append(torch.stack(scalars))
        if not parts:
            return {}
        values = torch.cat(parts).tolist()  # the one read
        figures = {
            n: v if per[n] == "total" else v / max(1, counts.of(per[n])) for n, v in zip(names, values, strict=False)
        }
        figures.update(zip(extra, values[len(names) :], strict=True))
        return figures


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only), and hands its figures to the
    run's trackers (``report_to``: :mod:`posttrain.tracking`)."""

    def __init__(self, path: Path, trackers: Sequence[Any] = ()) -> None:
        self.path = path
        self.trackers = list(trackers)

    def keep_until(self, step: int) -> None:
        """Drop lines after ``step`` (a resumed run rewrites them), atomically."""
        if not distributed.is_main() or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if _keep(r, step)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.trackers:
            from posttrain.tracking import numbers

            for tracker in self.trackers:
                tracker.log(numbers(clean), int(clean.get("step") or 0), str(clean.get("split", "train")))

    def close(self) -> None:
        """The run has ended: the trackers flush and finish."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _keep(record: dict[str, Any], step: int) -> bool:
    return int(record.get("step", 0)) <= step


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
