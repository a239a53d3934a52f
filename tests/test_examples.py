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
