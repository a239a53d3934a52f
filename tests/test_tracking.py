"""report_to: every figure of metrics.jsonl reaches the trackers at the same steps (a recording double given
as module:Class, and TensorBoard's event files); a resumed run purges what a killed run logged after its
checkpoint; the key is checked when the config is read and may change between a run and its resume."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from support import first_bundled_pairs, run_config

import posttrain
from posttrain import tracking
from posttrain.cli import main
from posttrain.config import ConfigError, load
from posttrain.training import checkpoint
from posttrain.training.metrics import read_metrics


class Recorder:
    """A tracker that keeps what it is given (every instance, in order, on the class)."""

    made: ClassVar[list[Recorder]] = []

    def __init__(self, output_dir: Path, config: Mapping[str, Any], start_step: int = 0) -> None:
        self.output_dir, self.config, self.start_step = output_dir, config, start_step
        self.logged: list[tuple[str, int, dict[str, float]]] = []
        self.closed = False
        Recorder.made.append(self)

    def log(self, figures: Mapping[str, float], step: int, split: str) -> None:
        self.logged.append((split, step, dict(figures)))

    def close(self) -> None:
        self.closed = True


def not_a_class() -> None:
    """Named by a test as a tracker: refused."""


@pytest.fixture(autouse=True)
def _fresh_recorders() -> None:
    Recorder.made.clear()


def expected(out: Path) -> list[tuple[str, int, dict[str, float]]]:
    return [(r["split"], r["step"], tracking.numbers(r)) for r in read_metrics(out / "metrics.jsonl")]


def test_every_line_of_metrics_reaches_the_tracker(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "run"
    posttrain.train(run_config("dpo", tiny_model_dir, pairs, out, max_steps=3, eval_steps=2,
                               report_to=["test_tracking:Recorder"]))  # fmt: skip
    (recorder,) = Recorder.made
    assert recorder.logged == expected(out) and recorder.closed and recorder.start_step == 0
    assert {split for split, _, _ in recorder.logged} == {"train", "eval"} and recorder.config["method"] == "dpo"


def test_tensorboard_purges_the_steps_after_the_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while saving the end state (step 4; the last checkpoint is step 2): the resumed run replays
    steps 3 and 4, and TensorBoard holds each step once, with metrics.jsonl's values. report_to may change on
    resume: the recorder added then starts at the checkpoint's step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "run"
    config = run_config("dpo", tiny_model_dir, pairs, out, max_steps=4, save_steps=2, report_to=["tensorboard"])
    save = checkpoint.save_checkpoint

    def dies_at_the_end(output_dir: Path, step: int, *args: Any, **kwargs: Any) -> Path:
        if step == 4:
            raise KeyboardInterrupt("killed while saving the end state")
        return save(output_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", dies_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        posttrain.train(config)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    posttrain.train({**config, "report_to": ["tensorboard", "test_tracking:Recorder"]}, resume=True)
    (recorder,) = Recorder.made
    assert recorder.start_step == 2 and [(s, step) for s, step, _ in recorder.logged] == [("train", 3), ("train", 4),
                                                                                          ("eval", 4)]  # fmt: skip
    events = EventAccumulator(str(out / tracking.TENSORBOARD_DIR))
    events.Reload()
    for split, key in (("train", "loss"), ("train", "lr"), ("train", "policy_margin"), ("eval", "loss")):
        logged = [(r["step"], r[key]) for r in read_metrics(out / "metrics.jsonl") if r["split"] == split]
        shown = [(e.step, e.value) for e in events.Scalars(f"{split}/{key}")]
        assert [s for s, _ in shown] == [s for s, _ in logged], (split, key)
        assert [v for _, v in shown] == pytest.approx([v for _, v in logged], rel=1e-6), (split, key)


def test_checked_when_the_config_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"method": "dpo", "model": "m", "data": {"train": "t.jsonl"}, "output_dir": str(tmp_path / "o")}
    for entries, message in [
        (["wandb"], "report_to: unknown tracker 'wandb'; one of tensorboard, or an import path 'module:Class'"),
        (["no_such_module_here:Tracker"], "report_to: 'no_such_module_here:Tracker': cannot import"),
        (["test_tracking:not_a_class"], "report_to: 'test_tracking:not_a_class': not a class"),
        (["test_tracking:Recorder", "test_tracking:Recorder"], "report_to: 'test_tracking:Recorder' is listed twice"),
        ("tensorboard", "report_to: expected a list"),
    ]:
        with pytest.raises(ConfigError) as err:
            load({**raw, "report_to": entries})
        assert str(err.value).startswith(message), err.value
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"tensorboard needs the tensorboard package: pip install 'posttrain\["):
        load({**raw, "report_to": ["tensorboard"]})


def test_cli_refuses_a_bad_tracker_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "dpo", "model": "m", "data": {"train": "t.jsonl"},
                                    "output_dir": str(tmp_path / "o"), "report_to": ["mlflow"]}))  # fmt: skip
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "report_to: unknown tracker 'mlflow'" in err and not (tmp_path / "o").exists()
