"""Reward mistakes, each one line naming the reward: checked when the config is read (before any model
loads), against the data before anything samples, and at every rollout (a value that is not a finite
number). ``module:function`` resolves from the config file's folder, then the current directory."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_faults_input import fails

from posttrain.config import ConfigError, load
from posttrain.rewards.combine import CombinedReward, RewardError, load_reward
from posttrain.rewards.rules import NumericAnswer

UNREAD_MODEL = "/nonexistent/never-read-model"  # a reward error first shows that no model was read


def prompts_file(folder: Path, rows: int = 4, **columns: Any) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1), **columns}) + "\n"
                            for i in range(rows)))  # fmt: skip
    return path


def grpo_config(folder: Path, rewards: list[Any], model: str | Path = UNREAD_MODEL, **values: Any) -> Path:
    raw = {
        "method": "grpo", "model": str(model), "output_dir": str(folder / "run"), "rewards": rewards,
        "data": {"train": str(prompts_file(folder)), "max_length": 48}, "num_generations": 2, "batch_size": 2,
        "max_steps": 1, "generation": {"max_new_tokens": 3}, "beta": 0.0, **values,
    }  # fmt: skip
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def user_module(folder: Path, source: str) -> str:
    """A module file of a unique name (each test imports its own) in ``folder``; returns its name."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    return name


# ------------------------------------------------------------------------------- checked when read


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        (
            [{"name": "numeric_anser"}],
            "rewards[0] (numeric_anser): not a built-in reward nor an import path 'package.module:function' "
            "(did you mean 'numeric_answer'?); built-ins: length_penalty, numeric_answer, ",
        ),
        ([{"name": "no_such_module_xyz:fn"}], "rewards[0] (no_such_module_xyz:fn): cannot import 'no_such_module_xyz'"),
        (
            [{"name": "posttrain.rewards.rules:NumericAnswr"}],
            "rewards[0] (posttrain.rewards.rules:NumericAnswr): 'posttrain.rewards.rules' has no attribute "
            "'NumericAnswr' (did you mean 'NumericAnswer'?)",
        ),
        (
            [{"name": "numeric_answer", "colum": "answer"}],
            "rewards[0] (numeric_answer): unknown option 'colum' (did you mean 'column'?); it takes column, correct, "
            "wrong, tolerance, name, weight, label",
        ),
        ([{"name": "regex_format"}], "rewards[0] (regex_format): missing a required argument: 'pattern'"),
        (
            [{"name": "numeric_answer", "tolerance": "small"}],
            "rewards[0] (numeric_answer): option tolerance: expected a number, got 'small'",
        ),
        (
            [{"name": "numeric_answer", "tolerance": math.inf}],
            "rewards[0] (numeric_answer): option tolerance: must be a finite number, got inf",
        ),
        (
            [{"name": "regex_format", "pattern": "(unclosed"}],
            "rewards[0] (regex_format): not a valid regular expression: missing ), unterminated subpattern",
        ),
        (
            [{"name": "length_penalty", "target_chars": 5, "target_tokens": 5}],
            "rewards[0] (length_penalty): ValueError: LengthPenalty takes exactly one of target_chars and "
            "target_tokens",
        ),
        (
            [{"name": "numeric_answer", "weight": "heavy"}],
            "rewards[0] (numeric_answer): weight must be a finite number",
        ),
        ([{"name": "numeric_answer", "weight": True}], "rewards[0] (numeric_answer): weight must be a finite number"),
        ([{"name": "numeric_answer", "weight": math.inf}], "rewards[0] (numeric_answer): weight must be a finite"),
        ([{"name": "numeric_answer", "weight": math.nan}], "rewards[0] (numeric_answer): weight must be a finite"),
        (
            ["numeric_answer", {"name": "numeric_answer", "column": "answer"}],
            "rewards[1] (numeric_answer): logged as 'numeric_answer' like rewards[0]: give one of them another 'label'",
        ),
        (
            [{"name": "numeric_answer", "label": "r"}, {"name": "regex_format", "pattern": "x", "label": "r"}],
            "rewards[1] (regex_format): logged as 'r' like rewards[0]",
        ),
        (
            [{"name": "reward_model", "path": "/nowhere/rm"}],
            "rewards[0] (reward_model): path: /nowhere/rm: no such folder (and not a hub id, NAME or ORG/NAME)",
        ),
        ([{"name": "reward_model"}], "rewards[0] (reward_model): missing a required argument: 'path'"),
        ([3], "rewards[0]: expected a reward name or a mapping {name, weight, ...}, got 3"),
        ([{"weight": 1.0}], "rewards[0]: name: is required: one of length_penalty, "),
        (
            [{"name": "posttrain.rewards.rules:extract_number", "x": 1}],
            "rewards[0] (posttrain.rewards.rules:extract_number): not a class, so it takes no options; got ['x']",
        ),
        ("numeric_answer", "rewards: expected a list, got 'numeric_answer'"),
    ],
)
def test_reward_mistakes_are_found_when_the_config_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rewards: Any, message: str
) -> None:
    config = grpo_config(tmp_path, rewards)
    assert fails(capsys, "train", str(config)).startswith(f"{config}: {message}")
    assert not (tmp_path / "run").exists()


def test_reward_model_path_is_a_file_or_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rm.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    for path, problem in ((tmp_path / "rm.bin", "is a file, not a model folder"),
                          (tmp_path / "empty", "holds no config.json (not a saved model)")):  # fmt: skip
        config = grpo_config(tmp_path, [{"name": "reward_model", "path": str(path)}])
        assert fails(capsys, "train", str(config)) == f"{config}: rewards[0] (reward_model): path: {path} {problem}"


def test_a_user_module_that_does_not_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = user_module(tmp_path, "def reward(prompts, completions:\n")
    config = grpo_config(tmp_path, [{"name": f"{name}:reward"}])
    assert fails(capsys, "train", str(config)) == (
        f"{config}: rewards[0] ({name}:reward): importing {name!r} failed: SyntaxError: '(' was never closed "
        f"({name}.py, line 1)"
    )


def test_module_function_resolves_from_the_config_folder_then_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "def reward(prompts, completions, **columns):\n    return [1.0 for _ in completions]\n"
    beside_config = user_module(tmp_path / "configs", source)
    in_cwd = user_module(tmp_path / "work", source)
    monkeypatch.chdir(tmp_path / "work")
    rewards = [f"{beside_config}:reward", {"name": f"{in_cwd}:reward"}]
    config = grpo_config(tmp_path / "configs", rewards, model="hub-org/model")
    assert [r if isinstance(r, str) else r["name"] for r in load(config).rewards] == [
        f"{beside_config}:reward",
        f"{in_cwd}:reward",
    ]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = grpo_config(elsewhere, ["not_here_either_xyz:reward"], model="hub-org/model")
    with pytest.raises(ConfigError, match=rf"cannot import 'not_here_either_xyz' .*looked in {elsewhere}, "):
        load(missing)
    # A file next to the config did not stay importable from everywhere: sys.path is as it was.
    import sys

    assert str(tmp_path / "configs") not in sys.path


def test_a_pipeline_stage_names_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "model": UNREAD_MODEL, "output_dir": str(tmp_path / "runs"), "data": {"train": str(prompts_file(tmp_path))},
        "stages": [{"method": "grpo", "rewards": [{"name": "numeric_answer", "tolernce": 0.1}]}],
    }))  # fmt: skip
    assert fails(capsys, "train", str(path)) == (
        f"{path}: stages[0] (0-grpo): rewards[0] (numeric_answer): unknown option 'tolernce' (did you mean "
        "'tolerance'?); it takes column, correct, wrong, tolerance, name, weight, label"
    )
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- checked against the data


def test_a_reward_needing_a_missing_column(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = grpo_config(tmp_path, [{"name": "numeric_answer", "column": "solution"}], model=tiny_model_dir)
    data = tmp_path / "prompts.jsonl"
    assert fails(capsys, "train", str(config)) == (
        f"{data}: row 1: reward 'numeric_answer' needs the column 'solution' (columns: answer)"
    )
    assert not (tmp_path / "run").exists()
    # A user function says what it needs by its parameters.
    name = user_module(
        tmp_path, "def reward(prompts, completions, level, **columns):\n    return [0.0] * len(prompts)\n"
    )
    config = grpo_config(tmp_path, [f"{name}:reward"], model=tiny_model_dir)
    expected = f"{data}: row 1: reward '{name}:reward' needs the column 'level' (columns: answer)"
    assert fails(capsys, "train", str(config)) == expected


def test_a_column_value_the_reward_cannot_read(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = grpo_config(tmp_path, ["numeric_answer"], model=tiny_model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 1 + 1?", "answer": a}) + "\n" for a in ("2", "two")))
    assert fails(capsys, "train", str(config)) == (
        f"{data}: row 2: field 'answer': holds no number: 'two' (read by reward 'numeric_answer')"
    )
    assert not (tmp_path / "run").exists()


def test_a_column_missing_from_one_row(tmp_path: Path) -> None:
    from posttrain.data.formats import DataError
    from posttrain.data.prompts import PromptRecord

    rows = [PromptRecord((1,), "q", i, {"answer": "1"} if i != 2 else {"answer": None}, row=i + 1) for i in range(4)]
    with pytest.raises(DataError, match=r"^d\.jsonl: row 3: reward 'correct' needs the column 'answer'"):
        CombinedReward([("correct", NumericAnswer(), 1.0)]).check_columns("d.jsonl", rows)


# ------------------------------------------------------------------------------------ at each rollout


def returning(values: Any) -> Any:
    return lambda prompts, completions, **columns: values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, math.nan], "reward 'r' returned nan (float, not a finite float) for sample 1 (prompt 'b')"),
        ([math.inf, 0.0], "reward 'r' returned inf (float, not a finite float) for sample 0 (prompt 'a')"),
        ([1.0, None], "reward 'r' returned None (NoneType, not a finite float) for sample 1 (prompt 'b')"),
        (["0.5", 1.0], "reward 'r' returned '0.5' (str, not a finite float) for sample 0 (prompt 'a')"),
        ([1.0, [2.0]], "reward 'r' returned [2.0] (list, not a finite float) for sample 1 (prompt 'b')"),
        ([1.0], "reward 'r' returned 1 values for 2 samples"),
        ([1.0, 2.0, 3.0], "reward 'r' returned 3 values for 2 samples"),
        ("10", "reward 'r' returned str, not a list of floats"),
        ({"a": 1.0, "b": 2.0}, "reward 'r' returned dict, not a list of floats"),
        (None, "reward 'r' returned NoneType, not a list of floats"),
    ],
)
def test_reward_outputs_are_checked(values: Any, message: str) -> None:
    with pytest.raises(RewardError) as info:
        CombinedReward([("r", returning(values), 1.0)]).score(["a", "b"], ["x", "y"])
    assert str(info.value) == message
    assert info.value.reward == "r"


def test_numbers_of_any_kind_are_accepted() -> None:
    import numpy as np
    import torch

    values = [np.float32(0.5), torch.tensor(2.0), True, 3]
    scores = CombinedReward([("r", returning(values), 1.0)]).score(["a"] * 4, ["x"] * 4)
    assert scores.total == [0.5, 2.0, 1.0, 3.0]


def test_a_bad_reward_value_stops_the_run_in_one_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At the first rollout: exit 1, the reward and its first bad value named; no model, no checkpoint."""
    name = user_module(
        tmp_path, "def reward(prompts, completions, **columns):\n    return [float('nan')] * len(prompts)\n"
    )
    config = grpo_config(tmp_path, [f"{name}:reward"], model=tiny_model_dir, save_steps=1)
    message = fails(capsys, "train", str(config), status=1)
    assert message.startswith(f"reward '{name}:reward' returned nan (float, not a finite float) for sample 0 (prompt ")
    run = tmp_path / "run"
    assert not (run / "model").exists() and not (run / "checkpoints").exists()


def test_load_reward_takes_the_config_folder(tmp_path: Path) -> None:
    name = user_module(tmp_path / "cfg", "class Scaled:\n    def __init__(self, scale: float = 1.0):\n"
                       "        self.scale = scale\n    def __call__(self, prompts, completions, **columns):\n"
                       "        return [self.scale] * len(prompts)\n")  # fmt: skip
    loaded = load_reward({"name": f"{name}:Scaled", "scale": "2e0"}, folders=[tmp_path / "cfg"])
    assert loaded.fn(["q"], ["a"]) == [2.0]  # YAML's exponent strings read as numbers, as everywhere else
