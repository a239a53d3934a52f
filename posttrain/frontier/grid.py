"""A frontier config: a grid of methods x strengths, all trained from one model, and how points are measured.

A frontier config is a pipeline config (:mod:`posttrain.pipeline`: shared keys at the top, ``model``,
``output_dir``) whose ``grid`` replaces ``stages``, plus a ``frontier`` section::

    model: embedded:smollm2-135m-instruct
    output_dir: runs/frontier-sentiment
    data: {train: bundled:sentiment_train.jsonl, eval: bundled:sentiment_heldout.jsonl, chat_template: false}
    rewards: [sentiment]
    grid:
      - {method: grpo, learning_rate: 1.0e-5, vary: {beta: [0.02, 0.1]}}    # runs grpo-beta-0.02, grpo-beta-0.1
      - {label: dpo-offline, method: iterative_dpo, rounds: 1, vary: {beta: [0.1, 0.5]}}
    frontier: {points: 3, samples: 1, seed: 0, shown: 3, kl_budgets: [5, 10]}

Each grid entry is one curve (``label``, default its method) and, with ``vary: {KEY: [v1, v2, ...]}``, one
run per value (its strength); a run is named ``LABEL-KEY-VALUE`` and writes to ``output_dir/NAME`` as a
pipeline stage does. Every run starts from the top-level ``model`` (none is chained to another), so the
pipeline's rules apply unchanged: everything is checked before the first run, a finished run with the same
config is reused, an unfinished one needs ``--resume``. An entry's ``points`` (default ``frontier.points``)
is how many models along each of its runs' paths are measured: a denser path for one curve. A run that does
not say how often to save gets ``save_steps`` so that it leaves that many checkpoints along its path, and
one that does not say how many checkpoints stay resumable gets ``keep_resumable: 1``: the older checkpoints
are points, kept as models without their optimizer state (a fifth of the disk for a full fine-tune with
AdamW).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.algorithms import ALGORITHMS, Algorithm, IterativeDPO
from posttrain.config import ConfigError, TrainConfig, apply_overrides
from posttrain.data.formats import read_rows, resolve_source
from posttrain.fields import nearest
from posttrain.pipeline import NAME, read_raw, stages_of

FRONTIER_KEYS = ("points", "samples", "seed", "shown", "data", "kl_budgets")
POINT_DATA_KEYS = ("split", "max_length", "max_prompt_length", "chat_template")
"""The ``data`` keys that change a point's prompts; with ``generation`` and ``precision``, the grid's shared values
sample every point (:func:`point_config`)."""
RESERVED = ("frontier", "quick-model", "quick-data")
"""Folder names of ``output_dir`` that the frontier itself writes: not run labels."""


def _check_count(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}: must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class FrontierSettings:
    """How each point of the frontier is measured (the ``frontier:`` section)."""

    points: int = 3
    """Checkpoints measured per run, spread along its path (the last one is the final model)."""
    samples: int = 1
    """Completions per held-out prompt at each point."""
    seed: int = 0
    """The sampling seed: every point samples the same prompts with the same seed."""
    shown: int = 3
    """Sample completions kept per point in frontier.json and frontier.html."""
    data: str | None = None
    """Held-out prompts; default: the shared ``data.eval``."""
    kl_budgets: tuple[float, ...] = ()
    """KLs (nats per completion) at which each run's best reward is tabled (:mod:`posttrain.frontier.budget`)."""

    def __post_init__(self) -> None:
        for key, low in (("points", 1), ("samples", 1), ("shown", 0)):
            _check_count(f"frontier.{key}", getattr(self, key), low)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"frontier.seed: must be an integer, got {self.seed!r}")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ConfigError(f"frontier.data: must be a data file, got {self.data!r}")
        budgets = self.kl_budgets
        if not isinstance(budgets, (list, tuple)) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0 for b in budgets
        ):
            raise ConfigError(f"frontier.kl_budgets: must be a list of numbers > 0 (nats), got {budgets!r}")
        object.__setattr__(self, "kl_budgets", tuple(sorted({float(b) for b in budgets})))


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: its stage name, its curve and its strength (``key=value``, or '' for none)."""

    name: str
    label: str
    strength: str
    points: int
    """Models measured along its path: its entry's ``points``, else ``frontier.points``."""


def method_name(algorithm: Algorithm) -> str:
    """The method a run belongs to on the plot and in the per-method table: the algorithm's name, and for
    ``iterative_dpo`` its loss and whether it samples once (``offline dpo``: ``rounds: 1``, the DPO paper's
    setting) or every round (``online dpo``, ``online distill``): different methods on a frontier."""
    if isinstance(algorithm, IterativeDPO):
        return f"{'offline' if algorithm.rounds == 1 else 'online'} {algorithm.loss}"
    return algorithm.name


@dataclass(frozen=True)
class Grid:
    pipeline: dict[str, Any]
    """The pipeline config the grid expands to (every stage with the top-level model)."""
    runs: list[GridRun]
    settings: FrontierSettings
    output_dir: Path
    eval_data: str
    folder: Path | None = None
    """The config file's folder (None for a dict): a reward ``module:function`` is looked for there first."""


def _value_name(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_grid(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Grid:
    """The grid of a frontier config (a YAML path or a dict) with ``--set`` overrides of its shared keys."""
    raw = apply_overrides(read_raw(source), list(overrides))
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    try:
        grid = _expand(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from err
    return dataclasses.replace(grid, folder=Path(source).parent) if isinstance(source, (str, Path)) else grid


def _expand(raw: dict[str, Any]) -> Grid:
    if "stages" in raw:
        raise ConfigError("stages: a frontier config lists its runs under `grid` (each run starts from `model`)")
    grid = raw.pop("grid", None)
    if not isinstance(grid, list) or not grid:
        raise ConfigError("grid: expected a non-empty list of runs, each a mapping with at least `method`")
    section = raw.pop("frontier", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"frontier: expected a mapping, got {section!r}")
    for key in section:
        if key not in FRONTIER_KEYS:
            raise ConfigError(f"frontier.{key}: unknown key{nearest(key, FRONTIER_KEYS)}")
    settings = FrontierSettings(**section)
    if not isinstance(raw.get("model"), str):
        raise ConfigError("model: is required (every run of the grid starts from it)")
    stages: list[dict[str, Any]] = []
    runs: list[GridRun] = []
    for i, entry in enumerate(grid):
        if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
            raise ConfigError(f"grid[{i}]: expected a mapping with at least `method`, got {entry!r}")
        entry = dict(entry)
        algorithm = ALGORITHMS.get(entry["method"])
        if algorithm is not None and algorithm.data_kind != "prompts":
            raise ConfigError(
                f"grid[{i}].method: {entry['method']} trains on given data; a frontier's runs sample prompts "
                "(offline DPO on pairs sampled once from the model: method iterative_dpo with rounds: 1)"
            )
        label, vary = entry.pop("label", entry["method"]), entry.pop("vary", None)
        points = entry.pop("points", settings.points)
        _check_count(f"grid[{i}].points", points, 1)
        if not isinstance(label, str) or not NAME.fullmatch(label):
            raise ConfigError(f"grid[{i}].label: expected letters, digits, '.', '_' or '-', got {label!r}")
        if label in RESERVED:
            raise ConfigError(f"grid[{i}].label: {label!r} is the name of a folder the frontier writes; choose another")
        if any(r.label == label for r in runs):
            raise ConfigError(f"grid[{i}].label: {label!r} is already the label of an earlier entry")
        for key in ("name", "output_dir", "model"):
            if key in entry:
                raise ConfigError(f"grid[{i}].{key}: set by the frontier (every run starts from the top-level model)")
        variants: list[tuple[str, dict[str, Any]]] = [("", {})]
        if vary is not None:
            if not isinstance(vary, dict) or len(vary) != 1:
                raise ConfigError(f"grid[{i}].vary: expected one key and its list of values, got {vary!r}")
            ((key, values),) = vary.items()
            if key in ("name", "output_dir", "model", "method"):
                raise ConfigError(f"grid[{i}].vary.{key}: set by the frontier, not a strength to vary")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid[{i}].vary.{key}: expected a non-empty list of values, got {values!r}")
            variants = [(f"{key}={_value_name(v)}", {key: v}) for v in values]
        for strength, change in variants:
            name = f"{label}-{strength.replace('=', '-')}" if strength else label
            stage = {**copy.deepcopy(entry), **change, "name": name, "model": raw["model"]}
            stages.append(stage)
            runs.append(GridRun(name, label, strength, points))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid: two runs are named {next(n for n in names if names.count(n) > 1)!r}")
    eval_data = settings.data or (raw.get("data") or {}).get("eval")
    if not eval_data:
        raise ConfigError("frontier.data: the held-out prompts are required (or a shared data.eval)")
    if not isinstance(raw.get("output_dir"), str) or not raw["output_dir"]:
        raise ConfigError("output_dir: is required (run NAME writes to output_dir/NAME)")
    pipeline = {**raw, "stages": stages}
    _add_save_steps(pipeline, [r.points for r in runs])
    return Grid(pipeline, runs, settings, Path(raw["output_dir"]), str(eval_data))


def point_config(grid: Grid) -> TrainConfig:
    """The config every point of the grid is sampled and scored with: its first run's (the runs share the rewards
    and the reference), with the grid's shared sampling keys in place of the run's own: the top-level
    ``generation`` and ``precision`` and the ``data`` keys :data:`POINT_DATA_KEYS` (their defaults where the top
    level gives none). A run's own values of these are its training's, so neither the runs a sitting trains
    (``--only``) nor their order changes what a point is (a run's ``generation.batch_size`` changes the draws)."""
    own = {k: v for k, v in grid.pipeline["stages"][0].items() if k not in ("generation", "precision")}
    if isinstance(own.get("data"), dict):
        own["data"] = {k: v for k, v in own["data"].items() if k not in POINT_DATA_KEYS}
    return stages_of({**grid.pipeline, "stages": [own]})[0].config


def _add_save_steps(pipeline: dict[str, Any], points: list[int]) -> None:
    """``save_steps`` for every run that sets none, so that it leaves its ``points`` models along its path: the
    checkpoints of its steps (an iterative run's rounds count as points, its steps within a round too); and
    ``keep_resumable: 1`` for every run that saves checkpoints and sets none. A run left without checkpoints
    (an iterative run whose rounds are the points) gets no ``keep_resumable``, a shared one included: it
    would have nothing to keep."""
    shared = pipeline.get("save_steps")
    for stage, count in zip(pipeline["stages"], points, strict=True):
        if "save_steps" not in stage and shared is None:
            every = _points_every(stage, pipeline, count)
            if every is not None:
                stage["save_steps"] = every
        if stage.get("save_steps", shared) is None:
            stage.setdefault("keep_resumable", None)
        elif "keep_resumable" not in stage and "keep_resumable" not in pipeline:
            stage["keep_resumable"] = 1  # the older checkpoints are points: models, not resumable states


def _points_every(stage: dict[str, Any], pipeline: dict[str, Any], points: int) -> int | None:
    """The ``save_steps`` that leaves ``points`` models along a run's path, None where it needs none."""
    if stage.get("method") == "iterative_dpo":
        rounds = int(stage.get("rounds", pipeline.get("rounds", 1)))
        steps = stage.get("steps_per_round", pipeline.get("steps_per_round"))
        if rounds >= points:
            return None  # the rounds' models are the points
        if not isinstance(steps, int):
            raise ConfigError(
                f"{stage['name']}: steps_per_round: needed to save {points} points along {rounds} round(s) "
                "(or give save_steps)"
            )
        return max(1, steps // math.ceil(points / rounds))
    steps = stage.get("max_steps", pipeline.get("max_steps"))
    if isinstance(steps, int) and steps > 0:
        return max(1, steps // points)  # at least `points` models; spread() picks
    return None


def select(grid: Grid, only: Sequence[str]) -> Grid:
    """The grid's runs named by ``only`` (``--only``): a curve's label (all its runs) or one run's name."""
    known = list(dict.fromkeys([*(r.label for r in grid.runs), *(r.name for r in grid.runs)]))
    for name in only:
        if name not in known:
            raise ConfigError(f"--only: {name!r} is not a label or run of the grid{nearest(name, known)}; "
                              f"labels: {', '.join(dict.fromkeys(r.label for r in grid.runs))}")  # fmt: skip
    keep = [i for i, r in enumerate(grid.runs) if r.label in only or r.name in only]
    pipeline = {**grid.pipeline, "stages": [grid.pipeline["stages"][i] for i in keep]}
    return dataclasses.replace(grid, pipeline=pipeline, runs=[grid.runs[i] for i in keep])


# ------------------------------------------------------------------------------------------- --quick

QUICK_ROWS = 6
QUICK_STEPS = {"learning_rate": 1e-3, "max_steps": 3, "batch_size": 2, "num_generations": 2, "steps_per_round": 3,
               "prompts_per_round": 6, "save_steps": 1}  # fmt: skip


def quick(grid: Grid) -> Grid:
    """The same grid on a tiny model, a few prompts and a few steps, in ``OUTPUT_DIR-quick``: every stage of
    the frontier (training, checkpoints, sampling, KL, the table and the plot) end to end in seconds."""
    from posttrain.fixtures import save_tiny

    out = grid.output_dir.with_name(grid.output_dir.name + "-quick")
    model_dir = out / "quick-model"
    if not (model_dir / "config.json").is_file():
        tmp = out / ".quick-model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny(tmp, chat_template=None)
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)  # whole or absent: a killed write is not reused
    pipeline = copy.deepcopy(grid.pipeline)
    data = dict(pipeline.get("data") or {})
    for key in ("train", "eval"):
        if data.get(key):
            data[key] = str(_first_rows(str(data[key]), out / "quick-data" / f"{key}.jsonl"))
    eval_data = str(_first_rows(grid.eval_data, out / "quick-data" / "heldout.jsonl"))
    data["max_length"] = 128  # the tiny tokenizer spells words in pieces: room for every prompt
    pipeline.update(model=str(model_dir), output_dir=str(out), data=data)
    generation = dict(pipeline.get("generation") or {})
    generation["max_new_tokens"] = min(int(generation.get("max_new_tokens", 8)), 8)
    pipeline["generation"] = generation
    for key in ("max_steps", "batch_size", "micro_batch_size", "num_generations", "save_steps", "eval_steps"):
        pipeline.pop(key, None)
    for stage in pipeline["stages"]:
        stage["model"] = str(model_dir)
        method = stage.get("method")
        for key, value in QUICK_STEPS.items():
            if key in ("steps_per_round", "prompts_per_round", "rounds") and method != "iterative_dpo":
                continue
            if key == "num_generations" and method == "ppo":
                continue
            stage[key] = value
        if method == "iterative_dpo":
            stage["rounds"] = min(int(stage.get("rounds", 1)), 2)
            # A random tiny model's samples mostly tie: more of them, and one pair is a batch.
            stage.update(num_generations=6, batch_size=1)
            stage.pop("max_steps", None)
        for key in ("micro_batch_size", "eval_steps", "critic_warmup_steps"):
            stage.pop(key, None)
    settings = dataclasses.replace(grid.settings, data=eval_data)
    return Grid(pipeline, grid.runs, settings, out, eval_data, grid.folder)


def _first_rows(source: str, target: Path) -> Path:
    """The first :data:`QUICK_ROWS` rows of a data file, written as JSON lines to ``target``."""
    rows = []
    for _, row in read_rows(resolve_source(source)):
        rows.append(row)
        if len(rows) == QUICK_ROWS:
            break
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(target)
    return target
