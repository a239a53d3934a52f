"""The run folder as a state machine (posttrain.training.rundir): one run per folder (the lock), a failed or
killed run before its first checkpoint restarts in place, files posttrain did not write are never touched,
an unwritable folder is refused before anything loads. Each case: the exit status, the one-line message and
what the folder holds afterwards."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from faults import assert_same_run, child, listing, one_error_line, read_only, state_of, wait_for, write_config
from safetensors import SafetensorError
from support import BIT_EXACT, first_bundled_pairs, run_config

import posttrain
from posttrain import distributed
from posttrain.cli import main
from posttrain.config import ConfigError
from posttrain.training import checkpoint, rundir, runlock


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return run_config("dpo", model, data, out, **{"max_steps": 4, "micro_batch_size": 4, **BIT_EXACT, **extra})


@pytest.fixture(scope="module")
def straight(tiny_model_dir: Path, pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of :func:`config`: what every restarted run must equal, bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    posttrain.train(config(tiny_model_dir, pairs_file, out))
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(folder: Path, **fields: Any) -> None:
    """A lock as this machine's runs write it (fields override)."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {"host": socket.gethostname(), "machine": runlock._machine(), "pid": dead_pid(),
               "process_start": None, "since": time.time() - 100, "heartbeat": time.time(), **fields}  # fmt: skip
    (folder / "posttrain.lock").write_text(json.dumps(content))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- the lock


def test_a_second_run_on_the_folder_is_refused_and_the_first_is_unharmed(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first run, held at its first step in another process, owns the folder: a second start (plain or
    --resume) is refused in one line naming the owner, changes nothing, and the first run ends as an
    uninterrupted one would (no interleaved metrics lines, the same model)."""
    out = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out))
    first = child("hold", path)
    try:
        wait_for(tmp_path / "reached", first)
        before = listing(out)
        for extra in ((), ("--resume",)):
            code, _, err = cli(capsys, "train", str(path), *extra)
            assert code == 2
            assert one_error_line(err).startswith(
                f"output_dir: {out} is in use by another run (host {socket.gethostname()}, pid {first.pid}, since "
            )
            assert "; wait for it to end or choose another output_dir" in err
        assert listing(out) == before and state_of(out)["state"] == "running"
    finally:
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert_same_run(straight, out)
    assert state_of(out)["state"] == "finished" and not (out / "posttrain.lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, straight: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed at its start (its lock and a ``running`` state left, nothing else): the rerun sees the
    lock's process is gone, takes it over, says so, and trains as if the folder were new."""
    out = tmp_path / "run"
    plant_lock(out)
    (out / "run_state.json").write_text(json.dumps({"state": "running", "pid": 1}))
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out))
    code, stdout, _ = cli(capsys, "train", str(path))
    assert code == 0
    assert f"output_dir: {out}: the run that held it (host {socket.gethostname()}, pid " in stdout
    assert "is gone; taking it over" in stdout
    assert_same_run(straight, out)
    assert state_of(out)["state"] == "finished" and not (out / "posttrain.lock").exists()


@pytest.mark.parametrize(
    ("fields", "stale"),
    [
        ({"pid": 1, "process_start": "0"}, True),  # a live pid that a later process reuses
        ({"pid": os.getpid()}, False),  # this very process
        ({"machine": "elsewhere", "host": "elsewhere", "heartbeat": time.time() - 3600}, True),
        ({"machine": "elsewhere", "host": "elsewhere"}, False),  # fresh heartbeat on another machine
    ],
)
def test_when_a_lock_is_stale(tmp_path: Path, fields: dict[str, Any], stale: bool) -> None:
    plant_lock(tmp_path / "run", **fields)
    lock = runlock.Lock(tmp_path / "run")
    if stale:
        lock.acquire()
        assert json.loads((tmp_path / "run" / "posttrain.lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / "run" / "posttrain.lock").exists()
    else:
        with pytest.raises(ConfigError, match=r"^output_dir: .* is in use by another run \(host "):
            lock.acquire()
        assert (tmp_path / "run" / "posttrain.lock").exists()


def test_the_heartbeat_is_refreshed_while_the_lock_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.02)
    (tmp_path / "run").mkdir()
    lock = runlock.Lock(tmp_path / "run")
    lock.acquire()
    first = json.loads((tmp_path / "run" / "posttrain.lock").read_text())["heartbeat"]
    time.sleep(0.3)
    later = json.loads((tmp_path / "run" / "posttrain.lock").read_text())["heartbeat"]
    lock.release()
    assert later > first and not (tmp_path / "run" / "posttrain.lock").exists()


def test_a_pipeline_holds_one_lock_for_its_root(tmp_path: Path) -> None:
    """Folders under a locked root (a pipeline's stages, iterative DPO's rounds) take no lock of their own;
    the root itself, held by a live run, is refused."""
    root = tmp_path / "pipe"
    with rundir.locked(root):
        assert (root / "posttrain.lock").exists()
        with rundir.claim(root / "sft", resume=False) as folder:
            assert folder.checkpoint is None and not (root / "sft" / "posttrain.lock").exists()
            (root / "sft" / "metrics.jsonl").write_text("")
        assert state_of(root / "sft")["state"] == "finished"
        with pytest.raises(ConfigError, match=r"^output_dir: .*pipe is in use by another run"), rundir.locked(root):
            pass
    assert listing(root) == ["sft", "sft/metrics.jsonl", "sft/run_state.json"]  # unlocked


# ---------------------------------------------------------------------------------------- the folder's story


def test_a_run_failed_before_its_first_checkpoint_restarts_in_place(
    tiny_model_dir: Path,
    pairs_file: Path,
    tmp_path: Path,
    straight: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An error at the first step: the folder says ``failed`` with the error, the lock is gone; a plain rerun
    (or --resume) clears it, also the temporary folders of interrupted writes, and trains from step 0."""
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, pairs_file, out)
    real = distributed.reduce_gradients

    def boom(params: Any) -> None:
        raise RuntimeError("the reward server went away\nsecond line")

    monkeypatch.setattr(distributed, "reduce_gradients", boom)
    with pytest.raises(RuntimeError, match="reward server"):
        posttrain.train(cfg)
    monkeypatch.setattr(distributed, "reduce_gradients", real)
    assert state_of(out)["state"] == "failed"
    assert state_of(out)["error"] == "RuntimeError: the reward server went away"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "run_state.json"]
    (out / ".model-x1y2").mkdir()  # what a kill during writes leaves
    (out / "checkpoints" / ".step-000002-abc").mkdir(parents=True)
    path = write_config(tmp_path / "c.yaml", cfg)
    for extra in ((), ("--resume",)):
        code, stdout, _ = cli(capsys, "train", str(path), *extra)
        assert code == 0
        assert (
            f"output_dir: {out}: the previous run failed (RuntimeError: the reward server went away) before its "
            "first checkpoint; starting it again" in stdout
        )
        assert_same_run(straight, out)
        assert state_of(out)["state"] == "finished" and not (out / "posttrain.lock").exists()
        if not extra:
            assert f"output_dir: {out}: removed 2 unfinished writes of a killed run" in stdout
            assert not (out / ".model-x1y2").exists() and not (out / "checkpoints").exists()
        failed = {**state_of(out), "state": "failed", "error": "RuntimeError: the reward server went away"}
        (out / "run_state.json").write_text(json.dumps(failed))  # as it was, for the --resume round


def test_an_error_during_a_restart_is_the_folder_s_new_story(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted run that then fails on input found late (a reward's ConfigError at the first step): the
    folder says so (not the previous run's error), and stays restartable."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_state.json").write_text(json.dumps({"state": "failed", "error": "RuntimeError: old"}))
    (out / "metrics.jsonl").write_text("")

    def late(params: Any) -> None:
        raise ConfigError("rewards[0] (x): returned None")

    monkeypatch.setattr(distributed, "reduce_gradients", late)
    with pytest.raises(ConfigError, match="returned None"):
        posttrain.train(config(tiny_model_dir, pairs_file, out))
    assert state_of(out)["state"] == "failed" and state_of(out)["error"] == "ConfigError: rewards[0] (x): returned None"
    assert rundir.restartable(out) and not (out / "posttrain.lock").exists()


@pytest.mark.parametrize(
    ("setup", "resume", "message"),
    [
        ("foreign", False, "output_dir: {out} already holds files that no posttrain run marked as its own "
                           "(notes.txt); empty it or choose another output_dir"),
        ("foreign", True, "output_dir: {out} already holds files that no posttrain run marked as its own "
                          "(notes.txt); empty it or choose another output_dir"),
        ("failed+foreign", False, "output_dir: {out} holds a run that failed (ValueError: x) and files posttrain did "
                                  "not write (notes.txt); move them or choose another output_dir"),
        ("finished", False, "output_dir: {out} already holds files (a finished run); choose another output_dir, or "
                            "remove it to train again"),
        ("finished", True, "--resume: {out} holds a finished run but no checkpoint (set save_steps to make runs "
                           "resumable)"),
    ],
)  # fmt: skip
def test_folders_a_start_must_not_use_are_refused_untouched(
    tiny_model_dir: Path,
    pairs_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setup: str,
    resume: bool,
    message: str,
) -> None:
    """Files posttrain did not write, a finished run: one line, exit 2, the folder as it was (in particular
    --resume with nothing to resume never trains from scratch next to other files)."""
    out = tmp_path / "run"
    out.mkdir()
    if "foreign" in setup:
        (out / "notes.txt").write_text("keep")
    if setup == "failed+foreign":
        (out / "run_state.json").write_text(json.dumps({"state": "failed", "error": "ValueError: x"}))
        (out / "metrics.jsonl").write_text("")
    if setup == "finished":
        for name in ("config.yaml", "metrics.jsonl", "summary.json"):
            (out / name).write_text("")
        (out / "run_state.json").write_text(json.dumps({"state": "finished"}))
    before = {p: p.read_bytes() for p in out.rglob("*")}
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out))
    code, _, err = cli(capsys, "train", str(path), *(["--resume"] if resume else []))
    assert code == 2
    assert one_error_line(err) == message.format(out=out)
    assert {p: p.read_bytes() for p in out.rglob("*")} == before


def test_a_read_only_output_dir_is_refused_before_anything_loads(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Refused before the tokenizer, the data, the model and the reference load (each load would fail the
    test here); the folder, and a folder to create under a read-only one, stay as they were."""
    from posttrain.training import offline

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded before the output folder was checked")

    monkeypatch.setattr(offline, "load_tokenizer", never)
    monkeypatch.setattr(offline, "task_for", never)
    folder = tmp_path / "ro"
    with read_only(folder):
        for out, why in ((folder, "is not writable"), (folder / "run", "cannot be created")):
            path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out))
            code, _, err = cli(capsys, "train", str(path))
            assert code == 2
            assert one_error_line(err) == f"output_dir: {out} {why} (Read-only file system)" or (
                os.geteuid() != 0 and one_error_line(err) == f"output_dir: {out} {why} (Permission denied)"
            )
            assert list(folder.iterdir()) == []


def test_a_final_model_that_cannot_be_written_is_retried_then_one_line(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Without save_steps the final model is the run's only output: a failed write is tried again (a disk
    freed meanwhile saves the run); one that keeps failing ends the run with one line (exit 1) that says what
    is lost, and the folder says ``failed``, unlocked."""
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0))
    real, failures = checkpoint._write_once, []

    def full_disk(target: Path, write: Any) -> Path:
        if target.name == "model" and len(failures) < budget:
            failures.append(target)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, write)

    monkeypatch.setattr(checkpoint, "_write_once", full_disk)
    budget = 2  # fails twice, the third try succeeds
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, tmp_path / "ok", max_steps=1))
    code, _, err = cli(capsys, "train", str(path))
    assert code == 0 and err.count("posttrain: warning: writing") == 2 and "trying again in 0 s" in err
    assert (tmp_path / "ok" / "model" / "model.safetensors").is_file()

    failures.clear()
    budget = 3
    out = tmp_path / "full"
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, pairs_file, out, max_steps=1))
    code, _, err = cli(capsys, "train", str(path))
    assert code == 1
    assert one_error_line(err) == (
        f"{out / 'model'}: not written after 3 tries ([Errno 28] No space left on device); what it would have held "
        "is lost unless an earlier checkpoint holds it (save_steps): free space or fix the folder, then rerun or "
        "--resume"
    )
    assert state_of(out)["state"] == "failed" and state_of(out)["error"].startswith("WriteError: ")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "run_state.json"]
    assert rundir.restartable(out)  # and so a rerun starts it again


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"),
     SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")],
    ids=["oserror", "safetensors"],
)  # fmt: skip
def test_a_full_disk_is_a_failed_write_whoever_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, error: Exception
) -> None:
    """safetensors reports a full disk as its own error, not an OSError (what it said when a grid run filled
    this machine's disk): the weights' write is tried again and ends in the same one line, nothing left."""
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0))
    tries: list[Path] = []

    def write(tmp: Path) -> None:
        tries.append(tmp)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise error

    with pytest.raises(checkpoint.WriteError, match=r"model: not written after 3 tries \(.*No space left on device"):
        checkpoint.write_atomically(tmp_path / "model", write)
    assert len(tries) == 3 and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.count("trying again in 0 s") == 2


def test_a_safetensors_error_that_is_not_a_failed_write_is_not_retried(tmp_path: Path) -> None:
    """Only I/O is tried again: another safetensors error (tensors sharing memory, a bad name) is raised as is."""

    def write(tmp: Path) -> None:
        raise SafetensorError("Error while serializing: some tensors share memory")

    with pytest.raises(SafetensorError, match="share memory"):
        checkpoint.write_atomically(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_leaves_no_folder_behind(tiny_model_dir: Path, tmp_path: Path, capsys: Any) -> None:
    """A data error found after the folder was claimed: the folder this start created is removed again."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    out = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", config(tiny_model_dir, bad, out))
    code, _, err = cli(capsys, "train", str(path))
    assert code == 2 and "rejected" in one_error_line(err)
    assert not out.exists()
