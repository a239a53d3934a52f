"""``posttrain frontier CONFIG.yaml``: methods x strengths trained from one model, then reward against KL.

The picture that decides between methods (the DPO paper's Fig. 2, Rafailov et al. 2023, Sec. 6.1): every
run of a grid (:mod:`posttrain.frontier.grid`) is trained as a pipeline stage, finished runs reused; then
models along each run's path are measured on held-out prompts (:mod:`posttrain.frontier.points`) and the
points written as a table and a plot (:mod:`posttrain.frontier.output`). ``--quick`` does all of it on a
tiny model in seconds (the tests run it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError
from posttrain.frontier.grid import Grid, method_name, point_config, quick, read_grid, select

__all__ = ["run_frontier"]


def _check(grid: Grid, resume: bool, idle: Collection[str] = ()) -> list[Any]:
    """Every run checked before anything is written (its config, output folder and data rows, as a pipeline
    checks its stages), one set of rewards and one reference for all, held-out prompts unseen in training.
    ``idle``: runs not trained now (``--only``), whose unfinished folders are left as they are. Returns the
    stages, the finished ones marked ``done``."""
    from posttrain.config.loader import check_rewards
    from posttrain.data.formats import read_rows, resolve_source
    from posttrain.pipeline import validate

    if grid.folder is not None:  # a reward module next to the YAML: imported from there now, found by the runs
        for stage in [grid.pipeline, *grid.pipeline["stages"]]:
            try:
                check_rewards(stage.get("rewards") or (), (grid.folder,))
            except ConfigError as err:
                raise ConfigError(f"{stage.get('name', 'frontier')}: {err}") from err
    stages = validate(grid.pipeline, resume=resume, idle=idle)
    first = stages[0].config
    for stage in stages:
        if stage.config.rewards != first.rewards:
            raise ConfigError(f"{stage.label}: rewards: every run of a frontier is scored by the same rewards")
        if (stage.config.reference.model or stage.config.model) != (first.reference.model or first.model):
            raise ConfigError(f"{stage.label}: reference.model: every run of a frontier is measured against its model")
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
    the table and the plot with every finished run of the grid (a grid stopped part way has its figures).
    ``only``: the labels of the curves to train now (the table keeps the others' finished runs). Returns
    the result (what frontier.json holds)."""
    from posttrain import distributed
    from posttrain.frontier.budget import best_within, describe
    from posttrain.frontier.output import write_all
    from posttrain.frontier.points import PointMeter, keep_record, kept_points, path_points, spread
    from posttrain.pipeline import run_pipeline
    from posttrain.training import checkpoint
    from posttrain.training.first_round import shared_first_rounds

    grid = read_grid(source, list(overrides))
    if quick_mode:
        grid = quick(grid)
    training = select(grid, only) if only else grid
    names = {r.name for r in training.runs}
    every = _check(grid, resume, {r.name for r in grid.runs} - names)  # the whole grid: its finished runs
    stages = [s for s in every if s.name in names]
    settings = grid.settings
    # Every point of the grid is sampled alike, whichever runs --only trains now and in whatever order: with the
    # grid's shared sampling settings (a run's own generation.batch_size, say, would change the draws).
    meter = PointMeter(point_config(grid), settings, grid.eval_data)
    cache = grid.output_dir / "frontier" / "points"
    measured: dict[str, list[dict[str, Any]]] = {}
    result: dict[str, Any] = {"output_dir": str(grid.output_dir), "data": grid.eval_data, "samples": settings.samples,
                              "seed": settings.seed, "kl_budgets": list(settings.kl_budgets), "start": None,
                              "decoding": {"max_new_tokens": meter.config.generation.max_new_tokens,
                                           "batch_size": meter.config.generation.batch_size},
                              "runs": []}  # fmt: skip

    def shown(figures: dict[str, Any]) -> dict[str, Any]:  # the cache keeps every sample; the table a few
        return {**figures, "shown": figures["shown"][: settings.shown]}

    def points_of(stage: Any) -> list[dict[str, Any]]:
        run, out = grid.runs[[r.name for r in grid.runs].index(stage.name)], []
        for point in spread(path_points(stage.output_dir), run.points):
            t0 = time.monotonic()
            figures = meter.measure(point.model, cache / run.name / f"step-{point.step:06d}.json")
            log(f"frontier: {run.name} step {point.step}: reward {figures['reward']:.3f}, KL {figures['kl']:.2f} "
                f"nats, distinct-2 {figures['distinct_2']:.3f} "
                f"({'reused' if meter.reused else f'{time.monotonic() - t0:.0f} s'})")  # fmt: skip
            out.append({"step": point.step, "model": str(point.model), **shown(figures)})
        keep_record(cache / run.name, stage.config, meter.settings_key(), out)
        return out

    png = [False]  # whether the last write drew frontier.png (matplotlib is an extra)
    methods = {s.name: method_name(s.config.algorithm) for s in every}
    gone: set[str] = set()  # runs whose folder was removed, their points kept from the cache

    def write() -> None:
        result["runs"] = [
            {"run": r.name, "label": r.label, "method": methods[r.name], "strength": r.strength,
             "points": measured[r.name], **({"folder_removed": True} if r.name in gone else {}),
             "kl_budgets": [best_within(result["start"], measured[r.name], b) for b in settings.kl_budgets]}
            for r in grid.runs if r.name in measured
        ]  # fmt: skip
        notes = write_all(result, grid.output_dir)
        png[0] = not notes
        for note in notes:
            log(f"frontier: {note}")

    started = [time.monotonic()]

    def after(stage: Any, trained: Any) -> None:
        spent = time.monotonic() - started[0]
        if result["start"] is None:  # (inside the grid's lock, after its checks: the first thing measured)
            log(f"frontier: measuring the starting model on {len(meter.prompts)} held-out prompts")
            result["start"] = shown(meter.measure(None, cache / "start.json"))
            for other in every:  # finished runs of other curves (--only) are in the table too
                if other.done and other.name not in names:
                    measured[other.name] = points_of(other)
                elif other.name not in names and not other.output_dir.exists():
                    kept = kept_points(cache / other.name, other.config, meter.settings_key())
                    if kept is not None:
                        measured[other.name] = kept
                        gone.add(other.name)
                        log(
                            f"frontier: {other.name}: its folder {other.output_dir} was removed; the table keeps its "
                            f"{len(kept)} measured point(s) from {cache / other.name}"
                        )
        path = path_points(stage.output_dir)
        how = "finished earlier, reused" if stage.done else f"trained in {spent / 60:.1f} min"
        log(f"frontier: run {[s.name for s in stages].index(stage.name) + 1}/{len(stages)} {stage.name}: {how} "
            f"({path[-1].step if path else 0} steps)")  # fmt: skip
        measured[stage.name] = points_of(stage)
        write()
        for figure in next(r for r in result["runs"] if r["run"] == stage.name)["kl_budgets"]:
            log(f"frontier: {stage.name} within {figure['kl']:g} nats: {describe(figure)}")
        # A finished grid run is never resumed (the grid skips it): its newest checkpoint is a point, and its
        # optimizer state (2.15 GB on SmolLM2-135M, a PPO critic's too) would only fill the disk.
        keeps = stage.config.keep_resumable is not None and distributed.is_main()
        if keeps and checkpoint.slim(stage.output_dir, 0):
            log(f"frontier: {stage.name}: finished; its last checkpoint kept as a model, without training state")
        started[0] = time.monotonic()

    # An iterative run's first round samples the starting model: one per key, shared by the grid's runs (an
    # offline-DPO curve's betas train on the same pairs).
    with shared_first_rounds(grid.output_dir / "frontier" / "rounds"):
        run_pipeline(training.pipeline, resume=resume, on_stage=after)
    log(
        f"frontier: wrote {grid.output_dir / 'frontier.md'}, frontier.json, frontier.html"
        + (", frontier.png" if png[0] else "")
    )
    return result
