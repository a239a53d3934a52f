"""``posttrain frontier``: the grid a config expands to, the points along a run's path, the held-out check,
and the shipped example end to end with ``--quick`` (a tiny model: every run trained, every point measured,
the table and the plot written; a rerun reuses the runs and the points)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError
from posttrain.frontier import run_frontier
from posttrain.frontier.grid import read_grid, select
from posttrain.frontier.points import Point, path_points, spread
from posttrain.training import checkpoint

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "frontier_sentiment_first_grid.yaml"
SHIPPED = EXAMPLE.with_name("frontier_sentiment.yaml")  # the settings that met the targets


def grid_config(**changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": "some/model",
        "output_dir": "runs/f",
        "data": {"train": "bundled:sentiment_train.jsonl", "eval": "bundled:sentiment_heldout.jsonl"},
        "rewards": ["sentiment"],
        "grid": [
            {"method": "grpo", "max_steps": 10, "vary": {"beta": [0.01, 0.1]}},
            {"label": "dpo-offline", "method": "iterative_dpo", "rounds": 1, "steps_per_round": 9},
            {"label": "online-dpo", "method": "iterative_dpo", "rounds": 3, "steps_per_round": 4},
        ],
    }
    config.update(changes)
    return config


def test_grid_expands_to_unchained_runs_with_checkpoints_along_the_path() -> None:
    grid = read_grid(grid_config())
    names = [r.name for r in grid.runs]
    assert names == ["grpo-beta-0.01", "grpo-beta-0.1", "dpo-offline", "online-dpo"]
    assert [r.strength for r in grid.runs] == ["beta=0.01", "beta=0.1", "", ""]
    stages = grid.pipeline["stages"]
    assert all(s["model"] == "some/model" for s in stages)  # none starts from another's model
    assert [s.get("beta") for s in stages[:2]] == [0.01, 0.1]
    # 3 points: every 10 // 3 = 3 steps (3, 6, 9 and the final 10); one round of 9 steps: every 3; 3 rounds:
    # the round models are the points.
    assert [s.get("save_steps") for s in stages] == [3, 3, 3, None]
    # Older checkpoints: models, no AdamW state; the 3-round run saves none, so keeps none, a shared value
    # included.
    assert [s.get("keep_resumable", "unset") for s in stages] == [1, 1, 1, None]
    shared = read_grid(grid_config(keep_resumable=2)).pipeline["stages"]
    assert [s.get("keep_resumable", "unset") for s in shared] == ["unset", "unset", "unset", None]
    assert grid.eval_data == "bundled:sentiment_heldout.jsonl"
    assert [r.name for r in select(grid, ["online-dpo"]).runs] == ["online-dpo"]
    assert [r.points for r in grid.runs] == [3, 3, 3, 3]


def test_an_entry_may_measure_a_denser_path_than_the_frontier() -> None:
    """``points`` on an entry: its runs' models measured (and saved) along the path, the others' unchanged."""
    entries = [
        {"method": "grpo", "max_steps": 10, "vary": {"beta": [0.01, 0.1]}, "points": 5},
        {"label": "online-dpo", "method": "iterative_dpo", "rounds": 6, "steps_per_round": 20, "points": 12},
        {"label": "online-dpo-ends", "method": "iterative_dpo", "rounds": 6, "steps_per_round": 20},
    ]
    grid = read_grid(grid_config(grid=entries))
    assert [r.points for r in grid.runs] == [5, 5, 12, 3]
    # every 10 // 5 = 2 steps; 12 points over 6 rounds: 2 per round of 20 steps, every 10; the rounds' ends.
    assert [s.get("save_steps") for s in grid.pipeline["stages"]] == [2, 2, 10, None]
    assert "points" not in grid.pipeline["stages"][0]  # the frontier's, not a training key


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"frontier": {"point": 3}}, "frontier.point: unknown key (did you mean 'points'?)"),
        ({"frontier": {"points": 0}}, "frontier.points: must be an integer >= 1, got 0"),
        ({"grid": [{"method": "grpo", "points": 0}]}, "grid[0].points: must be an integer >= 1, got 0"),
        ({"grid": []}, "grid: expected a non-empty list of runs"),
        ({"grid": [{"method": "grpo", "vary": {"beta": [0.1], "lr": [1]}}]}, "grid[0].vary: expected one key"),
        ({"grid": [{"method": "grpo", "model": "x"}]}, "grid[0].model: set by the frontier"),
        ({"grid": [{"method": "grpo"}, {"method": "grpo"}]}, "grid[1].label: 'grpo' is already the label"),
        ({"stages": [{"method": "dpo"}]}, "stages: a frontier config lists its runs under `grid`"),
        ({"grid": [{"method": "grpo", "vary": {"model": ["a", "b"]}}]}, "grid[0].vary.model: set by the frontier"),
        ({"grid": [{"method": "grpo", "label": "frontier"}]}, "grid[0].label: 'frontier' is the name of a folder"),
        (
            {"grid": [{"method": "iterative_dpo", "rounds": 1}]},
            "iterative_dpo: steps_per_round: needed to save 3 points along 1 round(s)",
        ),
    ],
)
def test_grid_mistakes_are_one_line_each(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        read_grid(grid_config(**changes))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_only_label_names_the_labels() -> None:
    with pytest.raises(ConfigError, match=r"--only: 'grop' is not a label or run of the grid.*did you mean 'grpo'"):
        select(read_grid(grid_config()), ["grop"])
    assert [r.name for r in select(read_grid(grid_config()), ["grpo-beta-0.1"]).runs] == ["grpo-beta-0.1"]


def test_points_follow_the_path_across_rounds(tmp_path: Path) -> None:
    def model(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    for r, steps in ((1, 4), (2, 4)):
        train = tmp_path / f"round-{r}" / "train"
        model(train / "checkpoints" / "step-000002")
        model(train / "model")
        (train / "summary.json").write_text(json.dumps({"steps": steps}))
    assert [p.step for p in path_points(tmp_path)] == [2, 4, 6, 8]
    run = tmp_path / "plain"
    for step in (3, 6):
        model(run / "checkpoints" / f"step-{step:06d}")
    model(run / "model")
    (run / "summary.json").write_text(json.dumps({"steps": 7}))
    assert [p.step for p in path_points(run)] == [3, 6, 7]
    assert [p.step for p in spread([Point(s, tmp_path) for s in (1, 2, 3, 4, 5, 6)], 3)] == [2, 4, 6]
    # by step, not by index: checkpoints every 10 steps and a final model at 32 give 10, 20, 32 (not 10, 30, 32)
    assert [p.step for p in spread([Point(s, tmp_path) for s in (10, 20, 30, 32)], 3)] == [10, 20, 32]


def test_heldout_prompts_that_are_also_training_prompts_are_refused(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "The film was"}\n{"prompt": "The plot of"}\n')
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"prompt": "My review:"}\n{"prompt": "The plot of"}\n')
    config = grid_config(data={"train": str(train), "eval": str(heldout)}, output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"heldout.jsonl: row 2: the prompt is also row 2 of the training data"):
        run_frontier(config, quick_mode=True, log=lambda _: None)


def test_a_reward_module_next_to_the_yaml_is_found(tmp_path: Path) -> None:
    """A ``module:function`` reward beside the frontier's YAML is imported from there (as ``posttrain train``
    does): the check goes past the rewards and stops at the held-out overlap planted here."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "frontier_probe_reward_beside_yaml.py").write_text(
        "def score(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"
    )
    rows = '{"prompt": "The film was"}\n{"prompt": "The plot of"}\n'
    (folder / "train.jsonl").write_text(rows)
    (folder / "heldout.jsonl").write_text(rows)
    data = {"train": str(folder / "train.jsonl"), "eval": str(folder / "heldout.jsonl")}
    reward = "frontier_probe_reward_beside_yaml:score"
    config = grid_config(data=data, output_dir=str(tmp_path / "out"), rewards=[reward])
    config["grid"] = config["grid"][:1]
    (folder / "frontier.yaml").write_text(json.dumps(config))  # JSON is YAML
    with pytest.raises(ConfigError, match=r"heldout.jsonl: row 1: the prompt is also row 1"):
        run_frontier(folder / "frontier.yaml", quick_mode=True, log=lambda _: None)


def test_bundled_sentiment_heldout_prompts_are_unseen_in_training() -> None:
    from posttrain.data.formats import read_rows, resolve_source

    train = {r["prompt"] for _, r in read_rows(resolve_source("bundled:sentiment_train.jsonl"))}
    heldout = [r["prompt"] for _, r in read_rows(resolve_source("bundled:sentiment_heldout.jsonl"))]
    assert len(heldout) >= 100 and not train.intersection(heldout)


def test_pair_methods_are_refused_with_the_way_to_sample_pairs(tmp_path: Path) -> None:
    config = grid_config(output_dir=str(tmp_path / "out"), grid=[{"method": "dpo"}])
    config.pop("rewards")
    with pytest.raises(ConfigError, match=r"a frontier's runs sample prompts.*iterative_dpo with rounds: 1"):
        run_frontier(config, quick_mode=True, log=lambda _: None)


def test_example_end_to_end_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vaderSentiment")
    out = tmp_path / "frontier"
    assert main(["frontier", str(EXAMPLE), "--quick", "--set", f"output_dir={out}"]) == 0
    folder = tmp_path / "frontier-quick"
    result = json.loads((folder / "frontier.json").read_text())
    labels = {r["label"] for r in result["runs"]}
    assert labels == {"grpo", "rloo", "ppo", "online-dpo", "dpo-offline"}
    assert len(result["runs"]) == 10  # every method at two strengths
    assert result["start"]["kl"] == 0.0
    for run in result["runs"]:
        steps = [p["step"] for p in run["points"]]
        assert len(steps) == 3 and steps == sorted(steps), run["run"]
        for p in run["points"]:
            assert 0.0 <= p["distinct_2"] <= 1.0 and -1.0 <= p["reward"] <= 1.0
            assert p["samples"] == 6 and len(p["shown"]) == 3
            assert p["machine"]["device"] == "cpu" and p["machine"]["threads"] >= 1
    assert any(abs(p["kl"]) > 1e-3 for run in result["runs"] for p in run["points"])  # the models moved
    page = (folder / "frontier.html").read_text()
    assert "<svg" in page and "KL(policy || reference)" in page and "online-dpo beta=0.02" in page
    table = (folder / "frontier.md").read_text()
    # Per method (header, 5 methods), at equal KL (header, 10 runs); points (header, start, 10 x 3).
    assert table.count("\n| ") == (1 + 5) + (1 + 10) + (1 + 1 + 30)
    assert "| offline dpo | 2 |" in table and "| online dpo | 2 |" in table
    assert "| method | run | KL <= 5 | KL <= 10 |" in table  # the example's kl_budgets
    decoding = result["decoding"]  # the shared generation settings the points were sampled with, named
    assert f"at most {decoding['max_new_tokens']} new tokens, decoded {decoding['batch_size']} at a time" in table
    assert all(len(run["kl_budgets"]) == 2 for run in result["runs"])
    assert "Measured on: cpu (" in table and " threads, torch " in table
    assert (folder / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    lines = capsys.readouterr().out
    assert lines.count("frontier: run ") == 10 and "trained in" in lines
    assert lines.count(" within 10 nats: ") == 10  # each run's best at equal KL, in the log too
    # A finished run is never resumed: every checkpoint left is a model (a point) without training state.
    assert lines.count("its last checkpoint kept as a model, without training state") == 6  # 6 of 10 save any
    for run in result["runs"]:
        assert not any(checkpoint.resumable(path) for _, path in checkpoint.saved(folder / run["run"])), run["run"]
    # --quick gives the four DPO runs (two curves x two betas) the same prompts and sampling: one first round
    # sampled, three copied.
    assert len(list((folder / "frontier" / "rounds").iterdir())) == 1
    assert lines.count("round 1: pairs reused from ") == 3
    assert lines.rstrip().splitlines()[-1].endswith("frontier.html, frontier.png")

    # A rerun reuses every run and every measured point.
    assert main(["frontier", str(EXAMPLE), "--quick", "--set", f"output_dir={out}"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier, reused") == 10
    assert again.count(" s)") == 0 and again.count("(reused)") == 30  # no point measured again
    assert json.loads((folder / "frontier.json").read_text()) == result


def test_the_shipped_frontier_end_to_end_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The frontier a user runs first: the five methods of the issue (online DPO as reward distillation), each at
    two strengths, every run trained and measured along its path."""
    pytest.importorskip("vaderSentiment")
    out = tmp_path / "shipped"
    assert main(["frontier", str(SHIPPED), "--quick", "--set", f"output_dir={out}"]) == 0
    result = json.loads((tmp_path / "shipped-quick" / "frontier.json").read_text())
    methods = Counter(r["method"] for r in result["runs"])
    assert methods == {"grpo": 2, "rloo": 2, "ppo": 2, "online distill": 2, "offline dpo": 2}
    assert all(len(r["points"]) >= 2 for r in result["runs"])
    assert capsys.readouterr().out.count("trained in") == 10


def test_points_measured_on_several_machines_say_so() -> None:
    """Another machine samples other completions: the table names each point's machine when they differ."""
    from posttrain.frontier.output import markdown

    here = {"device": "cpu", "cpu": "CPU A", "cpus": 2, "threads": 2, "torch": "2.9"}
    there = {**here, "cpu": "CPU B"}
    figures = {"reward": 0.5, "reward_se": 0.1, "kl": 1.0, "kl_se": 0.1, "distinct_2": 0.9, "completion_length": 30}
    result: dict[str, Any] = {"output_dir": "runs/f", "data": "d.jsonl", "samples": 1, "seed": 0,
              "start": {**figures, "kl": 0.0},
              "runs": [{"run": "grpo-beta-0.1", "label": "grpo", "strength": "beta=0.1",
                        "points": [{"step": 5, **figures, "machine": here},
                                   {"step": 10, **figures, "machine": there}]}]}  # fmt: skip
    table = markdown(result)
    assert "Measured on 3 machines" in table
    assert "1. unrecorded" in table and "2. cpu (CPU A), 2 logical CPUs, 2 threads, torch 2.9" in table
    assert [line.rsplit("|", 2)[1].strip() for line in table.splitlines() if line.startswith("| grpo")] == ["2", "3"]
    for point in result["runs"][0]["points"]:
        point["machine"] = here
    result["start"]["machine"] = here
    assert "Measured on: cpu (CPU A), 2 logical CPUs, 2 threads, torch 2.9." in markdown(result)


def test_the_png_tells_methods_apart_when_colours_repeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One method more than the palette has colours: the last repeats the first's colour with another marker."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from posttrain.frontier.output import png
    from posttrain.report.svg import COLOURS

    drawn, real = [], Axes.plot

    def plot(self: Axes, *args: Any, **kwargs: Any) -> Any:
        drawn.append((kwargs["color"], kwargs["marker"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    point = {"step": 1, "reward": 0.5, "kl": 1.0}
    runs = [{"run": f"m{i}", "label": f"m{i}", "strength": "", "points": [point]} for i in range(len(COLOURS) + 1)]
    assert png({"start": {"reward": 0.1, "kl": 0.0}, "runs": runs}, tmp_path / "f.png") is None
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn[-1] == (drawn[0][0], "s") and drawn[0][1] == "o" and len(set(drawn)) == len(runs)


def test_a_sweep_reads_as_one_bold_curve_per_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three GRPO runs and one PPO run: one colour per method; GRPO's best within the largest budget is drawn
    bold with a legend entry, its other runs pale without one; the table names each method's best per budget."""
    pytest.importorskip("matplotlib")
    from html import escape

    from matplotlib.axes import Axes

    from posttrain.frontier.output import FAINT, html, markdown, png
    from posttrain.report.svg import COLOURS

    drawn, real = [], Axes.plot

    def plot(self: Axes, *args: Any, **kwargs: Any) -> Any:
        drawn.append((kwargs["color"], kwargs.get("alpha"), kwargs["label"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    figures = {"reward_se": 0.01, "kl_se": 0.1, "distinct_2": 0.9, "completion_length": 30.0}

    def run(name: str, method: str, at_5: float, at_10: float) -> dict[str, Any]:
        label, strength = name.rsplit("-", 1)
        budgets = [{"kl": b, "reward": r, "reward_se": 0.01, "steps": [10], "reached": True, "path_kl": 12.0}
                   for b, r in ((5.0, at_5), (10.0, at_10))]  # fmt: skip
        return {"run": name, "label": label, "method": method, "strength": f"beta={strength}", "kl_budgets": budgets,
                "points": [{"step": 10, "reward": at_10, "kl": 9.0, **figures}]}  # fmt: skip

    runs = [run("grpo-a-0.1", "grpo", 0.6, 0.7), run("ppo-0.1", "ppo", 0.4, 0.5),
            run("grpo-b-0.1", "grpo", 0.5, 0.8), run("grpo-c-0.1", "grpo", 0.7, 0.75)]  # fmt: skip
    result = {"output_dir": "runs/f", "data": "d.jsonl", "samples": 1, "seed": 0, "kl_budgets": [5.0, 10.0],
              "start": {"reward": 0.1, "kl": 0.0, **figures}, "runs": runs}  # fmt: skip
    assert png(result, tmp_path / "f.png") is None
    bold = [(colour, label) for colour, alpha, label in drawn if alpha is None]
    pale = [colour for colour, alpha, label in drawn if alpha == 0.3]
    assert bold == [(COLOURS[1], "ppo beta=0.1"), (COLOURS[0], "grpo: grpo-b beta=0.1")]  # grpo came first
    assert pale == [COLOURS[0], COLOURS[0]] and drawn[-1][2] == FAINT
    table = markdown(result)
    assert "| grpo | 3 | 0.700 ± 0.010 (step 10), grpo-c-0.1 | 0.800 ± 0.010 (step 10), grpo-b-0.1 |" in table
    assert "| ppo | 1 |" in table
    page = html(result)
    assert page.count('stroke-opacity="0.3"') == 2 and escape(FAINT) in page


def _point(step: int, kl: float, reward: float, se: float = 0.02) -> dict[str, Any]:
    return {"step": step, "kl": kl, "reward": reward, "reward_se": se}


START = {"kl": 0.0, "reward": 0.1, "reward_se": 0.04}


def test_best_reward_within_a_kl_budget_by_hand() -> None:
    from posttrain.frontier.budget import best_within

    path = [_point(15, 2.72, 0.396), _point(45, 8.94, 0.781, 0.027), _point(75, 10.15, 0.835, 0.025)]
    # On the line from step 45 to 75: w = (10 - 8.94) / (10.15 - 8.94) = 0.876; 0.781 + w * 0.054 = 0.8283.
    got = best_within(START, path, 10.0)
    assert got["steps"] == [45, 75] and got["reached"] and got["kl"] == 10.0
    assert got["reward"] == pytest.approx(0.781 + 1.06 / 1.21 * 0.054, abs=1e-6)
    assert got["reward_se"] == pytest.approx(0.027 + 1.06 / 1.21 * (0.025 - 0.027), abs=1e-6)
    # Below the first point: on the line from the start (step 0), 0.1 + (1 / 2.72) * 0.296 = 0.2088.
    first = best_within(START, path, 1.0)
    assert first["steps"] == [0, 15] and first["reward"] == pytest.approx(0.1 + 0.296 / 2.72, abs=1e-6)
    # A path that comes back: the better earlier point wins over the crossing after it (9.82 -> 9.85 -> 10.39).
    back = [_point(30, 9.82, 0.768), _point(40, 9.85, 0.716), _point(50, 10.39, 0.725)]
    assert best_within(START, back, 10.0)["steps"] == [30]
    # A path that stops short of the budget: its best point, not reached.
    short = best_within(START, [_point(10, 5.16, 0.483), _point(20, 5.89, 0.568), _point(30, 5.44, 0.560)], 10.0)
    assert (short["steps"], short["reward"], short["reached"]) == ([20], 0.568, False)
    with pytest.raises(ValueError, match="must be > 0"):
        best_within(START, path, 0.0)


def test_the_table_compares_runs_at_equal_kl() -> None:
    from posttrain.frontier.budget import best_within
    from posttrain.frontier.output import html, markdown

    figures = {"distinct_2": 0.9, "completion_length": 30, "kl_se": 0.1}
    points = [{**figures, **_point(10, 8.0, 0.7)}, {**figures, **_point(20, 12.0, 0.9, 0.04)}]
    short = [{**figures, **_point(10, 4.0, 0.5)}]
    result: dict[str, Any] = {"output_dir": "runs/f", "data": "d.jsonl", "samples": 1, "seed": 0,
              "kl_budgets": [5.0, 10.0],
              "start": {**figures, **START, "kl_se": 0.0},
              "runs": [{"run": "grpo-beta-0.1", "label": "grpo", "strength": "beta=0.1", "points": points},
                       {"run": "ppo", "label": "ppo", "strength": "", "points": short}]}  # fmt: skip
    for run in result["runs"]:
        run["kl_budgets"] = [best_within(result["start"], run["points"], b) for b in result["kl_budgets"]]
    table = markdown(result)
    assert "| method | run | KL <= 5 | KL <= 10 |" in table
    # grpo at 5 nats: 0.1 + (5 / 8) * 0.6 = 0.475 on the line from the start, s.e. 3/8 * 0.04 + 5/8 * 0.02 =
    # 0.0275; at 10: halfway from step 10 to 20.
    assert "| grpo | grpo-beta-0.1 | 0.475 ± 0.028 (steps 0-10) | 0.800 ± 0.030 (steps 10-20) |" in table
    assert "| ppo | ppo | 0.500 ± 0.020 (step 10), ends at 4.00 | 0.500 ± 0.020 (step 10), ends at 4.00 |" in table
    assert "Best reward within a KL budget" in html(result)
    del result["kl_budgets"]  # a frontier.json written before budgets existed, or without them: no table
    assert "Best reward within" not in markdown(result) and "Best reward within" not in html(result)


@pytest.mark.parametrize("budgets", [[0], [-1.0], ["10"], [True], 10, [float("inf")]])
def test_kl_budgets_must_be_positive_numbers(budgets: Any) -> None:
    with pytest.raises(ConfigError, match=r"frontier\.kl_budgets: must be a list of numbers > 0"):
        read_grid(grid_config(frontier={"kl_budgets": budgets}))


def test_kl_budgets_are_sorted_once_each() -> None:
    assert read_grid(grid_config(frontier={"kl_budgets": [10, 5, 10.0]})).settings.kl_budgets == (5.0, 10.0)
