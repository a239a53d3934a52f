"""Reading run folders for the report: a run, a pipeline's stages, iterative DPO's rounds.

What a folder holds decides how it is read (docs/config.md, "The run folder")::

    RUN/metrics.jsonl                 a run: config.yaml, summary.json, completions.jsonl beside it
    RUN/round-N/train/metrics.jsonl   iterative DPO: the rounds' offline runs, read as one run whose steps
                                      continue from round to round
    RUN/NAME/metrics.jsonl            a pipeline: each stage NAME a run (or an iterative DPO folder), in
                                      the order the stages started

Nothing here imports torch: a report is drawn from the files alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COMPLETION_STEPS = 3
"""Steps of completions.jsonl that the report shows: the first one and the last ones, up to this many."""


class ReportError(ValueError):
    """A folder the report cannot read; the message is one line naming it."""


@dataclass(frozen=True)
class Run:
    """One training run read back from its folder."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    completions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.config.get("method") or "?")

    def series(self, key: str, split: str) -> list[tuple[float, float | None]]:
        """``(step, value)`` of ``key`` in the lines of ``split`` (None where the value is null: not finite)."""
        points: list[tuple[float, float | None]] = []
        for record in self.metrics:
            if record.get("split") != split or key not in record:
                continue
            value = record[key]
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                points.append((float(record.get("step", 0)), None if value is None else float(value)))
        return points

    def keys(self, split: str) -> set[str]:
        return {k for r in self.metrics if r.get("split") == split for k in r}


@dataclass(frozen=True)
class Section:
    """Runs shown together: the runs given on the command line, or one stage of each pipeline given."""

    title: str
    runs: list[Run]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: unreadable ({' '.join(str(err).splitlines())})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object of a .jsonl file; a line cut short by a killed run (the last one) is skipped."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: unreadable ({' '.join(str(err).splitlines())})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ReportError(f"{path}: line {number}: not JSON") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (split, step), the last one written (a resumed run replays the steps after its checkpoint;
    posttrain drops the old lines, a copy of an older folder may not have), in step order."""
    kept: dict[tuple[str, float], dict[str, Any]] = {}
    for r in records:
        kept[(str(r.get("split", "train")), float(r.get("step", 0)))] = r
    return sorted(kept.values(), key=lambda r: float(r.get("step", 0)))


def _sample_completions(path: Path) -> list[dict[str, Any]]:
    """The first step's rows of completions.jsonl and the last steps', :data:`COMPLETION_STEPS` steps in all."""
    if not path.is_file():
        return []
    rows = _read_jsonl(path)
    steps = sorted({int(r.get("step", 0)) for r in rows})
    shown = set(steps[:1] + steps[-(COMPLETION_STEPS - 1) :]) if steps else set()
    return [r for r in rows if int(r.get("step", 0)) in shown]


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ReportError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    return raw if isinstance(raw, dict) else {}


def read_run(folder: Path, name: str | None = None) -> Run:
    """A run folder with metrics.jsonl (iterative DPO's folder: its rounds joined)."""
    if _rounds(folder):
        return _read_iterative(folder, name)
    summary = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    return Run(
        name=name or folder.name,
        path=folder,
        config=_config(folder),
        summary=summary if isinstance(summary, dict) else {},
        metrics=_latest(_read_jsonl(folder / "metrics.jsonl")),
        completions=_sample_completions(folder / "completions.jsonl"),
    )


def _rounds(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("round-*") if re.fullmatch(r"round-\d+", p.name) and (p / "train").is_dir()]
    return sorted((p for p in found if (p / "train" / "metrics.jsonl").is_file()), key=lambda p: int(p.name[6:]))


def _read_iterative(folder: Path, name: str | None) -> Run:
    """Iterative DPO: the rounds' metrics on one axis (round r's steps follow round r-1's), and a line per
    round (split ``round``) with its sampled pairs' mean reward, at the step where the round starts."""
    summary = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
    summary = summary if isinstance(summary, dict) else {}
    rounds = {int(r.get("round", 0)): r for r in summary.get("rounds", []) if isinstance(r, dict)}
    metrics: list[dict[str, Any]] = []
    completions: list[dict[str, Any]] = []
    offset = 0.0
    for path in _rounds(folder):
        number = int(path.name[6:])
        info = rounds.get(number, {})
        metrics.append({"split": "round", "step": offset, "round": number,
                        **{k: v for k, v in info.items() if isinstance(v, (int, float)) and k != "round"}})  # fmt: skip
        lines = _latest(_read_jsonl(path / "train" / "metrics.jsonl"))
        metrics += [{**r, "step": offset + float(r.get("step", 0)), "round": number} for r in lines]
        offset += max((float(r.get("step", 0)) for r in lines), default=0.0)
        completions = _pairs_sample(path / "pairs.jsonl", number) or completions
    return Run(name or folder.name, folder, _config(folder), summary, metrics, completions)


def _pairs_sample(path: Path, number: int, rows: int = 8) -> list[dict[str, Any]]:
    """A few of a round's sampled pairs, as completion rows (the best and the worst answer of a prompt)."""
    if not path.is_file():
        return []
    out = []
    for pair in _read_jsonl(path)[:rows]:
        for side in ("chosen", "rejected"):
            out.append({"step": f"round {number}", "prompt": pair.get("prompt"), "completion": pair.get(side),
                        "reward": pair.get(f"score_{side}"), "kind": side})  # fmt: skip
    return out


def _stages(folder: Path) -> list[Path]:
    """A pipeline's stage folders, in the order they started (each wrote its config.yaml first)."""
    found = [p for p in folder.iterdir() if p.is_dir() and ((p / "metrics.jsonl").is_file() or _rounds(p))]

    def started(p: Path) -> float:
        marker = p / "config.yaml" if (p / "config.yaml").is_file() else p
        return marker.stat().st_mtime

    return sorted(found, key=lambda p: (started(p), p.name))


def expand(folder: Path) -> list[tuple[str, Run]]:
    """``(section title, run)`` for each run in a folder: one for a run, one per stage for a pipeline."""
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such run folder")
    if (folder / "metrics.jsonl").is_file() or _rounds(folder):
        return [("", read_run(folder))]
    stages = _stages(folder)
    if not stages:
        raise ReportError(
            f"{folder}: no metrics.jsonl here (nor in a pipeline's stage folders): not a posttrain run folder, "
            "or a run that has not logged a step yet"
        )
    return [(stage.name, read_run(stage, name=folder.name)) for stage in stages]


def read_sections(folders: list[Path]) -> list[Section]:
    """The sections of a report on ``folders``: the plain runs together, then each pipeline stage (by name)
    with that stage of every pipeline given. Runs with the same folder name are told apart by their parent."""
    expanded = [expand(Path(f)) for f in folders]
    names = [Path(f).name for f in folders]
    sections: dict[str, list[Run]] = {}
    for folder, runs in zip(folders, expanded, strict=True):
        for title, run in runs:
            if names.count(Path(folder).name) > 1:
                run = dataclasses.replace(run, name=f"{Path(folder).parent.name}/{run.name}")
            sections.setdefault(title, []).append(run)
    return [Section(title, runs) for title, runs in sections.items()]
