"""Trackers: where the figures of metrics.jsonl go besides it (config key ``report_to``).

One seam: :class:`~posttrain.training.metrics.MetricsWriter` hands every line it writes to each tracker, as
``log(figures, step, split)``: the same figures at the same steps, under ``train/...`` and ``eval/...``
tags. A tracker is ``tensorboard`` (event files under ``output_dir/tensorboard``: torch's SummaryWriter,
which needs the ``tensorboard`` package, the extra ``posttrain[tensorboard]``), or an import path
``module:Class`` to a class of one's own (trackio, wandb, mlflow plug in so), built as
``Class(output_dir=..., config=..., start_step=...)``. A resumed run starts at its checkpoint's step: a
tracker drops what a killed run logged after it (TensorBoard: ``purge_step``), as metrics.jsonl does.

Names are checked when the config is read (:func:`check_trackers`); trackers are opened by the first
process only (:func:`open_trackers`). Nothing here is imported until a run asks for a tracker.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from posttrain.errors import ConfigError

if TYPE_CHECKING:
    from posttrain.config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's event files, inside output_dir."""


class Tracker(Protocol):
    """What a tracker does: take one metrics line's figures, and finish."""

    def log(self, figures: Mapping[str, float], step: int, split: str) -> None:
        """The numbers of one metrics.jsonl line (``split``: ``train`` or ``eval``) at optimizer step ``step``."""

    def close(self) -> None:
        """The run has ended: flush and release what the tracker holds."""


class TensorBoardTracker:
    """Event files for TensorBoard under ``output_dir/tensorboard``, one scalar per figure: ``train/loss``..."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any], start_step: int = 0) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run replays the steps after its checkpoint: events at those steps are dropped first.
        self.writer = SummaryWriter(
            str(Path(output_dir) / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
        )
        if not start_step:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(dict(config), sort_keys=False) + "```")

    def log(self, figures: Mapping[str, float], step: int, split: str) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


BUILTIN = {"tensorboard": TensorBoardTracker}


def _resolve(name: str) -> Any:
    """The class an entry of ``report_to`` names; ConfigError (one line, naming the key) when it cannot be used."""
    if name in BUILTIN:
        if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "report_to: tensorboard needs the tensorboard package: pip install 'posttrain[tensorboard]' "
                "(or pip install tensorboard)"
            )
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(
            f"report_to: unknown tracker {name!r}; one of {', '.join(BUILTIN)}, or an import path 'module:Class' "
            "(a class with log(figures, step, split) and close(): trackio, wandb, mlflow plug in so)"
        )
    from posttrain.rewards.specs import resolve  # the importer of module:function rewards, cwd included

    try:
        target = resolve(name)
    except ValueError as err:
        raise ConfigError(f"report_to: {name!r}: {' '.join(str(err).splitlines())}") from None
    missing = [m for m in ("log", "close") if not callable(getattr(target, m, None))]
    if not isinstance(target, type) or missing:
        what = "not a class" if not isinstance(target, type) else f"it has no {' nor '.join(missing)} method"
        raise ConfigError(
            f"report_to: {name!r}: {what}; a tracker is a class with log(figures, step, split) and close()"
        )
    return target


def check_trackers(names: Sequence[str]) -> None:
    """Every entry of ``report_to`` usable, none twice; ConfigError naming the key otherwise."""
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"report_to: {name!r} is listed twice")
        seen.add(name)
        _resolve(name)


def open_trackers(config: TrainConfig, output_dir: Path, start_step: int = 0) -> list[Any]:
    """The trackers of ``config.report_to`` (the first process's; [] in the others); ``start_step``: the
    checkpoint's step of a resumed run (0: a new one)."""
    from posttrain import distributed

    if not config.report_to or not distributed.is_main():
        return []
    raw = config.to_dict()
    return [_resolve(n)(output_dir=Path(output_dir), config=raw, start_step=start_step) for n in config.report_to]


def numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The figures of a metrics line a tracker takes: its numbers, less its split and step (a flag such as
    ``skipped`` and a null, i.e. non-finite, figure are left out).

    >>> numbers({"split": "train", "step": 3, "loss": 0.5, "skipped": True, "kl": None, "epoch": 1})
    {'loss': 0.5, 'epoch': 1.0}
    """
    return {k: float(v) for k, v in record.items()
            if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
