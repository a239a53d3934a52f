"""A frontier in several sittings: what ``--only`` trains, which points are reused from the caches, why a
reordered grid or a removed run folder keeps its figures, and which settings sample every point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from posttrain.algorithms.online import GRPO
from posttrain.config import ConfigError
from posttrain.frontier import run_frontier
from posttrain.frontier.grid import point_config, read_grid


def small_grid(model: Path, tmp_path: Path, **keys: Any) -> dict[str, Any]:
    """A frontier config on the tiny model: 6 training prompts, 3 held-out ones, a regex reward; ``keys`` add
    the grid and the rest."""
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Question {i}: say the word."}) + "\n" for i in range(6)))
    heldout.write_text("".join(json.dumps({"prompt": f"Held-out {i}: say a word."}) + "\n" for i in range(3)))
    return {
        "model": str(model), "output_dir": str(tmp_path / "grid"), "seed": 0,
        "data": {"train": str(train), "eval": str(heldout), "max_length": 64, "chat_template": False},
        "rewards": [{"name": "regex_format", "pattern": "e"}], "generation": {"max_new_tokens": 6},
        "learning_rate": 1e-3, "warmup_ratio": 0.0, **keys,
    }  # fmt: skip


def test_points_are_sampled_alike_whichever_run_is_trained_now(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run's own sampling settings (here ``generation.batch_size``, which changes the draws, and
    ``data.max_length``) are its training's: every point is sampled with the grid's shared ones, whichever run
    ``--only`` trains and whichever run comes first, so the cached points stay valid when the grid is reordered."""
    own = {"label": "b", "method": "grpo", "generation": {"batch_size": 1}, "data": {"max_length": 32}}
    config = small_grid(
        tiny_model_dir, tmp_path, max_steps=1, batch_size=2, num_generations=2, frontier={"points": 1, "shown": 1},
        grid=[own, {"label": "a", "method": "grpo"}],
    )  # fmt: skip
    result = run_frontier(config, only=["b"], log=lambda _: None)
    assert result["decoding"] == {"max_new_tokens": 6, "batch_size": 16}
    start = json.loads((tmp_path / "grid" / "frontier" / "points" / "start.json").read_text())
    assert start["key"]["settings"]["generation"]["batch_size"] == 16  # the shared default, not b's 1
    assert start["key"]["settings"]["prompt_limit"] == 32  # the shared max_length 64's, not b's 32's 16
    before = (tmp_path / "grid" / "frontier" / "points" / "start.json").stat().st_mtime_ns
    lines: list[str] = []
    run_frontier({**config, "grid": config["grid"][::-1]}, only=["a"], log=lines.append)
    assert sum("(reused)" in line for line in lines) == 1  # b's point; a's is new
    assert (tmp_path / "grid" / "frontier" / "points" / "start.json").stat().st_mtime_ns == before  # reused too


def test_a_grids_shared_sampling_settings_sample_its_points(tiny_model_dir: Path, tmp_path: Path) -> None:
    """point_config: the first run's config with the grid's shared generation, precision and data's prompt keys,
    their defaults where the grid gives none, the run's own values of them aside."""
    own = {"method": "grpo", "generation": {"batch_size": 1, "max_new_tokens": 9}, "precision": "bf16",
           "data": {"max_length": 32, "chat_template": True}, "beta": 0.3}  # fmt: skip
    config = small_grid(tiny_model_dir, tmp_path, max_steps=1, grid=[own])
    point = point_config(read_grid(config))
    assert (point.generation.batch_size, point.generation.max_new_tokens, point.precision) == (16, 6, "fp32")
    assert (point.data.max_length, point.data.chat_template) == (64, False)
    assert isinstance(point.algorithm, GRPO) and point.algorithm.beta == 0.3  # the run's own method keys
    assert point.data.train == config["data"]["train"]
    config["generation"] = {"max_new_tokens": 6, "batch_size": 2}
    assert point_config(read_grid(config)).generation.batch_size == 2


def test_a_grid_in_several_sittings(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``--only`` trains one curve; the next sitting trains the rest (a fresh iterative run under --resume
    starts), reuses the finished run and its points, and the table holds every run. A moved grid keeps them."""
    config = small_grid(
        tiny_model_dir, tmp_path, frontier={"points": 2, "shown": 1},
        grid=[
            {"method": "grpo", "max_steps": 2, "batch_size": 2, "num_generations": 2},
            {"label": "dpo-offline", "method": "iterative_dpo", "rounds": 1, "steps_per_round": 2, "batch_size": 1,
             "num_generations": 6, "prompts_per_round": 6},
        ],
    )  # fmt: skip
    # An unfinished run of another curve (failed in its first round, say) does not stop --only of this one.
    unfinished = tmp_path / "grid" / "dpo-offline"
    (unfinished / "round-1").mkdir(parents=True)
    (unfinished / "run_state.json").write_text(json.dumps({"state": "failed", "error": "No space left on device"}))
    with pytest.raises(ConfigError, match=r"dpo-offline.* holds an unfinished run; pass --resume"):
        run_frontier(config, log=lambda _: None)
    lines: list[str] = []
    first = run_frontier(config, only=["grpo"], log=lines.append)
    assert [r["run"] for r in first["runs"]] == ["grpo"] and len(first["runs"][0]["points"]) == 2
    assert (unfinished / "round-1").is_dir()  # left as it was
    shutil.rmtree(unfinished)
    lines.clear()
    second = run_frontier(config, resume=True, log=lines.append)
    assert [r["run"] for r in second["runs"]] == ["grpo", "dpo-offline"]
    assert second["runs"][0] == first["runs"][0] and second["start"] == first["start"]
    assert any("grpo: finished earlier, reused" in line for line in lines)
    assert sum("(reused)" in line for line in lines) == 2  # the grpo points, not measured again
    assert [p["step"] for p in second["runs"][1]["points"]] == [1, 2]
    assert json.loads((tmp_path / "grid" / "frontier.json").read_text()) == second

    # A moved grid (mv grid moved) keeps its runs and its measured points.
    (tmp_path / "grid").rename(tmp_path / "moved")
    lines.clear()
    third = run_frontier({**config, "output_dir": str(tmp_path / "moved")}, log=lines.append)
    assert sum("finished earlier, reused" in line for line in lines) == 2
    assert sum("(reused)" in line for line in lines) == 4, lines
    figures = lambda result: [{**p, "model": None} for r in result["runs"] for p in r["points"]]  # noqa: E731
    assert figures(third) == figures(second) and third["start"] == second["start"]  # (the paths are the new ones)

    # An entry's own `points`: fewer models of the finished grpo run measured (its save_steps, recomputed, may
    # change on a finished run), the cached one reused.
    config["grid"][0]["points"] = 1
    fourth = run_frontier({**config, "output_dir": str(tmp_path / "moved")}, log=lambda _: None)
    assert [p["step"] for p in fourth["runs"][0]["points"]] == [2]
    assert fourth["runs"][1]["points"] == third["runs"][1]["points"]


def test_a_removed_run_folder_keeps_its_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A finished run's folder removed to free the disk: the next ``--only`` sitting keeps its curve from the
    point cache, marked and said in a line; once its config is edited its old points are no longer shown."""
    config = small_grid(
        tiny_model_dir, tmp_path, max_steps=1, batch_size=2, num_generations=2, frontier={"points": 1, "shown": 1},
        grid=[{"label": "a", "method": "grpo"}, {"label": "b", "method": "grpo"}],
    )  # fmt: skip
    first = run_frontier(config, log=lambda _: None)
    shutil.rmtree(tmp_path / "grid" / "b")
    lines: list[str] = []
    second = run_frontier(config, only=["a"], log=lines.append)
    assert [r["run"] for r in second["runs"]] == ["a", "b"]
    assert (
        second["runs"][1] == {**first["runs"][1], "folder_removed": True} and "folder_removed" not in second["runs"][0]
    )
    assert any(
        f"b: its folder {tmp_path / 'grid' / 'b'} was removed; the table keeps its 1 measured point(s)" in x
        for x in lines
    )
    assert json.loads((tmp_path / "grid" / "frontier.json").read_text()) == second

    config["grid"][1]["learning_rate"] = 2e-3  # another run now: its old points are not its own
    third = run_frontier(config, only=["a"], log=lambda _: None)
    assert [r["run"] for r in third["runs"]] == ["a"]
