"""Every shipped example config reads and validates as the command that runs it would read it (no model
loads): a run config, a pipeline (`stages:`) or a frontier (`grid:`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.config import load
from posttrain.frontier.grid import read_grid
from posttrain.pipeline import stages_of

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_reads(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    if "grid" in raw:
        stages = stages_of(read_grid(path).pipeline)
        assert len(stages) >= 2
    elif "stages" in raw:
        assert len(stages_of(path)) >= 2
    else:
        assert load(path).output_dir


def test_the_shipped_frontier_runs_are_the_measured_ones() -> None:
    """examples/frontier_sentiment.yaml promises each run's measured figures: every run of it is a run of the
    research grids it was measured in, with the same config (its folder aside), and its points are sampled with
    the same settings, so the figures are its own."""
    folder = Path(__file__).resolve().parent.parent / "examples"

    def runs(name: str) -> dict[str, dict[str, object]]:
        stages = stages_of(read_grid(folder / name).pipeline)
        return {s.name: {k: v for k, v in s.config.to_dict().items() if k != "output_dir"} for s in stages}

    measured = runs("frontier_sentiment_8_openings.yaml")
    shipped = runs("frontier_sentiment.yaml")
    assert len(shipped) == 10
    for name, config in shipped.items():
        assert measured.get(name) == config, name
    # ... and its points are sampled as theirs were (the grid's shared generation settings draw them all).
    from posttrain.frontier.grid import point_config
    from posttrain.frontier.points import point_settings

    def sampled(name: str) -> dict[str, object]:
        grid = read_grid(folder / name)
        return point_settings(point_config(grid), grid.settings, grid.eval_data)

    assert sampled("frontier_sentiment.yaml") == sampled("frontier_sentiment_8_openings.yaml")
    assert sampled("frontier_sentiment.yaml") == sampled("frontier_sentiment_rloo.yaml")
