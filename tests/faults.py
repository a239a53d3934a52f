"""Shared helpers of the fault tests (test_faults_*.py): a run through the command line in a child process that
is killed with SIGKILL (or held) at a chosen moment, and comparisons of finished runs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# The child: ``posttrain train CONFIG [--resume]`` with one hook, then the CLI's exit status.
#   kill-step       SIGKILL at the first optimizer step (inside the loop, before any checkpoint)
#   kill-save-N     SIGKILL while the N-th checkpoint is written (its model files already in the temporary folder)
#   hold            at the first step, touch FOLDER/../reached and wait for FOLDER/../go
CHILD = """
import os, signal, sys, time
from pathlib import Path
from posttrain import distributed
from posttrain.cli import main
from posttrain.training import checkpoint

hook, config, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
signals = Path(config).parent
reduce, save_state, calls = distributed.reduce_gradients, checkpoint.save_state, []

def at_step(params):
    if hook == "kill-step":
        os.kill(os.getpid(), signal.SIGKILL)
    if hook == "hold" and not calls:
        calls.append(1)
        (signals / "reached").touch()
        while not (signals / "go").exists():
            time.sleep(0.05)
    return reduce(params)

def in_save(directory, state):
    calls.append(1)
    if hook == f"kill-save-{len(calls)}":
        os.kill(os.getpid(), signal.SIGKILL)
    return save_state(directory, state)

distributed.reduce_gradients = at_step
checkpoint.save_state = in_save
sys.exit(main(["train", config, *extra]))
"""


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def child(hook: str, config: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, hook, str(config), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def killed(hook: str, config: Path, *extra: str) -> None:
    """Run the child to its SIGKILL."""
    proc = child(hook, config, *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, (proc.returncode, err[-3000:])


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended ({proc.returncode}) first: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def state_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "run_state.json").read_text())


def listing(folder: Path) -> list[str]:
    """Every path under ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_same_run(straight: Path, other: Path) -> None:
    """Bitwise: the final models' tensors, and every logged training loss and learning rate."""
    from safetensors.torch import load_file

    from posttrain.training.metrics import read_metrics

    a, b = (
        load_file(str(straight / "model" / "model.safetensors")),
        load_file(str(other / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].equal(b[name]), name

    def train(d: Path) -> list[tuple[int, float, float]]:
        return [(m["step"], m["loss"], m["lr"]) for m in read_metrics(d / "metrics.jsonl") if m["split"] == "train"]

    assert train(other) == train(straight)


def one_error_line(err: str) -> str:
    """The last stderr line, which must be the run's only ``posttrain: error:`` line."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("posttrain: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-3000:]
    assert "Traceback" not in err
    return errors[0].removeprefix("posttrain: error: ")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` (empty) read-only for the block: by its mode, or for root (whom modes do not stop) a
    read-only tmpfs mounted on it; skipped where neither is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip("running as root without mount: no way to make a read-only folder here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)
