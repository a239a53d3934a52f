"""SIGTERM stops a run at the next optimizer step with a checkpoint (posttrain.training.stopping): through the
command line in a child process (a real signal from outside: exit status 143, one line, the folder
``stopped``, a plain start refused, ``--resume`` ending bit for bit as an uninterrupted run), and in-process
for the online loop, a request in the last step, a pipeline, iterative DPO's rounds, and the handler given back
afterwards."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faults import assert_same_run, child, state_of, wait_for, write_config
from support import BIT_EXACT, assert_same_causal_lm_run, first_bundled_pairs, run_config, write_word_prompts
from test_iterative import factory, two_rounds
from test_online import CANDIDATES, online_config

import posttrain
from posttrain import distributed
from posttrain.cli import main
from posttrain.config import load
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training import checkpoint
from posttrain.training.iterative import run_iterative
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online
from posttrain.training.stopping import Stopped


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    """Four DPO steps, no save_steps (a stop writes its checkpoint all the same), compared bit for bit."""
    return run_config("dpo", model, data, out, **{"max_steps": 4, "micro_batch_size": 4, **BIT_EXACT, **extra})


def signalled_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to this process while the ``step``-th optimizer step sums its gradients (every loop calls
    ``distributed.reduce_gradients`` once per optimizer step)."""
    reduce, calls = distributed.reduce_gradients, []

    def reduce_then_signal(params: Any) -> None:
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        reduce(params)

    monkeypatch.setattr(distributed, "reduce_gradients", reduce_then_signal)


def test_sigterm_from_outside_stops_with_a_checkpoint_and_resume_ends_as_straight(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run held in its first step in another process gets SIGTERM: it finishes the step, writes
    checkpoints/step-000001 (resumable, though save_steps is unset), says so in one line on stderr and exits
    with 143; the folder says stopped and the lock is gone; a plain start is refused; --resume ends as the
    uninterrupted run, bit for bit."""
    straight = tmp_path / "straight"
    posttrain.train(config(tiny_model_dir, pairs_file, straight))
    out = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out))
    proc = child("hold", path)
    try:
        wait_for(tmp_path / "reached", proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    ckpt = out / "checkpoints" / "step-000001"
    assert (
        lines[-1]
        == f"posttrain: stopped by SIGTERM after step 1 of 4; checkpoint {ckpt}: continue the run with --resume"
    )
    assert "Traceback" not in err
    assert checkpoint.resumable(ckpt) and not (out / "model").exists() and not (out / "posttrain.lock").exists()
    state = state_of(out)
    assert (state["state"], state["signal"], state["step"]) == ("stopped", "SIGTERM", 1)
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if m["split"] == "train"] == [1]

    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"a run that was stopped by SIGTERM after saving {ckpt.name}); pass --resume" in err
    assert main(["train", str(path), "--resume"]) == 0
    assert_same_run(straight, out)
    assert state_of(out)["state"] == "finished"
    assert not (out / "checkpoints").exists()  # the stop's checkpoint is gone once the run finished: as straight
    assert main(["train", str(path), "--resume"]) == 2  # a finished run without save_steps, as straight


def test_the_online_loop_stops_at_its_step_and_resumes_as_straight(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPO signalled in its second step: a checkpoint of step 2 (optimizer, RNG, step), Stopped raised;
    the resumed run's later figures and final weights equal an uninterrupted run's."""
    prompts = write_word_prompts(tmp_path / "prompts.jsonl", 8)
    extra: dict[str, Any] = {"max_steps": 4, "beta": 0.04, **BIT_EXACT}
    factory: Callable[[Any, Any], ScriptedGenerator] = lambda m, t: ScriptedGenerator(t, CANDIDATES, score_model=m)  # noqa: E731

    def train(out: Path, resume: bool = False) -> list[dict[str, Any]]:
        result = run_online(load(online_config("grpo", tiny_model_dir, prompts, out, **extra)), resume, factory)
        return [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]

    straight = train(tmp_path / "straight")
    with monkeypatch.context() as patch:
        signalled_at(2, patch)
        with pytest.raises(Stopped, match=r"^stopped by SIGTERM after step 2 of 4; checkpoint .*step-000002"):
            train(tmp_path / "run")
    assert state_of(tmp_path / "run")["state"] == "stopped"
    assert checkpoint.resumable(tmp_path / "run" / "checkpoints" / "step-000002")
    resumed = train(tmp_path / "run", resume=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert [(m["step"], m["loss"], m["reward"]) for m in resumed] == [
        (m["step"], m["loss"], m["reward"]) for m in straight
    ]
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_a_request_in_the_last_step_lets_the_run_finish(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """No step is left to stop at: a run of its own finishes as usual (model, summary, folder finished) and
    says that the signal came in its last step."""
    out = tmp_path / "run"
    signalled_at(4, monkeypatch)
    posttrain.train(config(tiny_model_dir, pairs_file, out))
    assert f"posttrain: SIGTERM came during the last step; the run in {out} finished" in capsys.readouterr().err
    assert state_of(out)["state"] == "finished"
    assert (out / "model" / "model.safetensors").exists() and (out / "summary.json").exists()
    assert not (out / "checkpoints").exists()


def test_a_stop_at_an_eval_step_evaluates_on_resume_and_leaves_the_scheduled_checkpoints(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_steps 2, eval_steps 3, stopped in step 3: the resumed run evaluates step 3 first, keeps the
    "before" figures, and ends with the checkpoints, metrics and summary figures of the uninterrupted run
    (the stop's step-3 checkpoint removed: no frontier point of its own)."""
    extra = {"save_steps": 2, "eval_steps": 3}
    straight = posttrain.train(config(tiny_model_dir, pairs_file, tmp_path / "straight", **extra))
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        signalled_at(3, patch)
        with pytest.raises(Stopped, match=r"after step 3 of 4"):
            posttrain.train(config(tiny_model_dir, pairs_file, out, **extra))
    assert [step for step, _ in checkpoint.saved(out)] == [2, 3]
    resumed = posttrain.train(config(tiny_model_dir, pairs_file, out, **extra), resume=True)
    assert_same_run(tmp_path / "straight", out)
    assert [step for step, _ in checkpoint.saved(out)] == [2, 4]
    evals = [{k: v for k, v in m.items() if not k.endswith("time_s")} for m in read_metrics(resumed.metrics_path)
             if m["split"] == "eval"]  # fmt: skip
    assert evals == [{k: v for k, v in m.items() if not k.endswith("time_s")} for m in
                     read_metrics(straight.metrics_path) if m["split"] == "eval"]  # fmt: skip
    assert [m["step"] for m in evals] == [0, 3, 4]
    assert resumed.summary["heldout_before"] == straight.summary["heldout_before"]


@pytest.mark.parametrize("step", [2, 4])
def test_a_pipeline_stops_in_its_stage_and_resume_finishes_it(
    step: int, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """SIGTERM in step 2 of a pipeline's first stage (of 4 steps), or in its last step: the command line's
    status is 143 (not a stage failure's 1), the stage's folder stopped at step 2 (or finished), the next
    stage not started; --resume trains what is left."""
    root = tmp_path / "pipe"
    stage = {k: v for k, v in config(tiny_model_dir, pairs_file, root).items() if k not in ("output_dir", "model")}
    pipeline = {"output_dir": str(root), "model": str(tiny_model_dir),
                "stages": [{**stage, "name": "first"}, {**stage, "name": "second"}]}  # fmt: skip
    path = tmp_path / "pipe.yaml"
    path.write_text(json.dumps(pipeline))
    with monkeypatch.context() as patch:
        signalled_at(step, patch)
        assert main(["train", str(path)]) == 143
    err = capsys.readouterr().err
    said = "after step 2 of 4; checkpoint " if step == 2 else f"once the run in {root / 'first'} had finished"
    assert f"posttrain: stopped by SIGTERM {said}" in err and "Traceback" not in err
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["first"]  # the second stage not started
    assert state_of(root / "first")["state"] == ("stopped" if step == 2 else "finished")
    assert main(["train", str(path), "--resume"]) == 0
    assert all(state_of(p)["state"] == "finished" for p in root.iterdir() if p.is_dir())


def test_iterative_dpo_stops_once_a_round_sampled_and_resume_trains_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGTERM while round 2 samples: its pairs are written, then the run stops before training on them (the
    folder stopped); --resume trains round 2 on the kept pairs and ends as the uninterrupted run."""
    cfg = two_rounds(tiny_model_dir, tmp_path, "it", **BIT_EXACT)
    straight = run_iterative(load({**cfg, "output_dir": str(tmp_path / "straight")}), generator_factory=factory)
    out = tmp_path / "it"

    def signals_in_round_2(model: Any, tokenizer: Any) -> ScriptedGenerator:
        if (out / "round-1" / "train" / "model").exists() and not (out / "round-2").exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return factory(model, tokenizer)

    with pytest.raises(Stopped, match=r"^stopped by SIGTERM once round 2 had sampled its pairs \(.*pairs.jsonl\)"):
        run_iterative(load(cfg), generator_factory=signals_in_round_2)
    assert state_of(out)["state"] == "stopped"
    assert (out / "round-2" / "round.json").exists() and not (out / "round-2" / "train").exists()
    resumed = run_iterative(load(cfg), resume=True, generator_factory=factory)
    assert resumed.summary["rounds"] == straight.summary["rounds"]
    assert_same_causal_lm_run(straight, resumed)


def test_the_handler_is_given_back(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Outside a run SIGTERM keeps the handler it had (here a marker), after a finished run too."""
    marker = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:

        def mine(signum: int, frame: Any) -> None:
            raise AssertionError("not called")

        signal.signal(signal.SIGTERM, mine)
        posttrain.train(config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, marker)
