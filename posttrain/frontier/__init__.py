"""``posttrain frontier CONFIG.yaml``: methods x strengths trained from one model, then reward against KL.

The picture that decides between methods (the DPO paper's Fig. 2, Rafailov et al. 2023, Sec. 6.1): every
run of a grid (:mod:`posttrain.frontier.grid`) is trained as a pipeline stage, finished runs reused; then
models along each run's path are measured on held-out prompts (:mod:`posttrain.frontier.points`) and the
points written as a table and a plot (:mod:`posttrain.frontier.output`). ``--quick`` does all of it on a
tiny model in seconds (the tests run it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError
from posttrain.frontier.grid import Grid, quick, read_grid, select

__all__ = ["run_frontier"]


def _check(grid: Grid) -> list[Any]:
    """Every run's config, checked: one set of rewards, held-out prompts unseen."""
    from posttrain.data.formats import read_rows, resolve_source
    from posttrain.pipeline import stages_of

    stages = stages_of(grid.pipeline)
    for stage in stages:
        if stage.config.rewards != stages[0].config.rewards:
            raise ConfigError(f"{stage.label}: rewards: every run of a frontier is scored by the same rewards")
    heldout = {str(row.get("prompt")): n for n, row in read_rows(resolve_source(grid.eval_data))}
    for source in dict.fromkeys(s.config.data.train for s in stages):
        for number, row in read_rows(resolve_source(source)):
            if str(row.get("prompt")) in heldout:
                raise ConfigError(
                    f"frontier.data: {grid.eval_data}: row {heldout[str(row.get('prompt'))]}: the prompt is also "
                    f"row {number} of the training data {source}; held-out prompts must be unseen"
                )
    return stages


def run_frontier(
    source: str | Path | dict[str, Any], overrides: Sequence[str] = (), resume: bool = False,
    quick_mode: bool = False, only: Sequence[str] = (), log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Train the grid's runs in order, finished runs reused; after each run, measure its points and rewrite
    the table and the plot with every run measured so far (a grid stopped part way has its figures). ``only``:
    the labels of the curves to train and measure (the others are left alone). Returns the result."""
    from posttrain.frontier.output import write_all
    from posttrain.frontier.points import PointMeter, path_points, spread
    from posttrain.pipeline import run_pipeline

    grid = read_grid(source, list(overrides))
    if only:
        grid = select(grid, only)
    if quick_mode:
        grid = quick(grid)
    stages = _check(grid)
    settings = grid.settings
    meter = PointMeter(stages[0].config, settings, grid.eval_data)
    cache = grid.output_dir / "frontier" / "points"
    log(f"frontier: {len(stages)} runs; measuring the starting model on {len(meter.prompts)} held-out prompts")
    start = meter.measure(None, cache / "start.json")
    result: dict[str, Any] = {"output_dir": str(grid.output_dir), "data": grid.eval_data, "samples": settings.samples,
                              "seed": settings.seed, "start": start, "runs": []}  # fmt: skip
    runs = {r.name: r for r in grid.runs}
    done = {s.name for s in stages if s.finished()}
    started = [time.monotonic()]

    def measure(stage: Any, trained: Any) -> None:
        spent = time.monotonic() - started[0]
        how = "finished earlier, reused" if stage.name in done else f"trained in {spent / 60:.1f} min"
        log(f"frontier: run {stage.index + 1}/{len(stages)} {stage.name}: {how} ({trained.steps} steps)")
        run, measured = runs[stage.name], []
        for point in spread(path_points(stage.output_dir), settings.points):
            t0 = time.monotonic()
            figures = meter.measure(point.model, cache / run.name / f"step-{point.step:06d}.json")
            log(f"frontier: {run.name} step {point.step}: reward {figures['reward']:.3f}, KL {figures['kl']:.2f} "
                f"nats, distinct-2 {figures['distinct_2']:.3f} ({time.monotonic() - t0:.0f} s)")  # fmt: skip
            measured.append({"step": point.step, "model": str(point.model), **figures})
        result["runs"].append({"run": run.name, "label": run.label, "strength": run.strength, "points": measured})
        for note in write_all(result, grid.output_dir):
            log(f"frontier: {note}")
        started[0] = time.monotonic()

    run_pipeline(grid.pipeline, resume=resume, on_stage=measure)
    log(f"frontier: wrote {grid.output_dir / 'frontier.md'}, frontier.json, frontier.html")
    return result
