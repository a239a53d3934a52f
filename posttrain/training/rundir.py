"""The run folder (``output_dir``): a small state machine that a run owns while it runs.

Besides what a run writes (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``model/``, ``summary.json``;
:mod:`posttrain.training.checkpoint`), the folder holds two files of its own:

* ``posttrain.lock``: the run that owns the folder (host, pid, heartbeat), taken atomically by the first
  process of a job, so a second run on the folder is refused in one line whenever it starts; a stale one
  (its process gone) is taken over, and it is removed when the run ends, by an exception too
  (:mod:`posttrain.training.runlock`). A pipeline locks its root (:func:`locked`), which covers its stages.
* ``run_state.json``: what happened, written atomically: ``running`` (started, or killed if its lock is
  gone), ``stopped`` (by SIGTERM, at a step boundary with a checkpoint: :mod:`posttrain.training.stopping`),
  ``failed`` (with the error's first line) or ``finished``.

How a start treats the folder (:func:`claim`): missing or empty, a new run. A run posttrain marked as
failed or killed before its first checkpoint starts again in place, with or without ``--resume`` (its files
are removed, the folder says so in one line). With a checkpoint, ``--resume`` continues from the latest
undamaged one and a plain start is refused; an iterative DPO run's ``round-N/`` folders count as its
checkpoints, which its ``--resume`` continues round by round (:mod:`posttrain.training.iterative`). A
finished run, a folder holding files posttrain did not write (no ``run_state.json``, or unknown names next
to it), and ``--resume`` with no checkpoint to resume are refused in one line. Temporary folders of
killed writes are removed at every start.

A resumed run must be the run that was saved: :func:`config_changes` compares the configs (a moved folder
is not a change) and :func:`check_fingerprints` the data's token ids and the starting weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from posttrain import distributed
from posttrain.config import ConfigError, TrainConfig
from posttrain.data.formats import DataError
from posttrain.training import checkpoint, stopping
from posttrain.training.reference import records_digest, weights_digest
from posttrain.training.runlock import LOCK_FILE, Lock, alive, covered, log, read_json, write_json

STATE_FILE = "run_state.json"
OWN_NAMES = frozenset(
    {"config.yaml", "metrics.jsonl", "summary.json", "model", "critic", "checkpoints", "completions.jsonl",
     "tensorboard", "report.html"}
)  # fmt: skip
"""What a run writes into its folder (and ``round-N/`` of iterative DPO; ``report.html``: `posttrain report`);
anything else is not posttrain's."""
ROUND = re.compile(r"round-\d+")
TEMPORARY = re.compile(r"\.(model|critic)-.+|(metrics|completions)\.tmp|\.posttrain\.lock\..+|\.run_state\.json\..+")
"""Leftovers of writes a kill interrupted (``checkpoints/.step-*`` too): removed at the next start."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- the folder's story


@dataclass(frozen=True)
class Found:
    """What a run folder holds, read without changing it."""

    path: Path
    entries: tuple[str, ...]
    """Names in the folder, less the lock, the state file and the leftovers of killed writes."""
    state: dict[str, Any] | None
    """``run_state.json``; None: no posttrain run marked the folder."""

    @property
    def foreign(self) -> list[str]:
        return [n for n in self.entries if n not in OWN_NAMES and not ROUND.fullmatch(n)]

    @property
    def story(self) -> str:
        state = self.state or {}
        if state.get("state") == "failed":
            return f"failed ({state.get('error')})"
        if state.get("state") == "stopped":
            return f"was stopped by {state.get('signal')}"
        return "finished" if state.get("state") == "finished" else "was killed"


def inspect(path: Path) -> Found:
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    entries = tuple(n for n in names if n not in (LOCK_FILE, STATE_FILE) and not TEMPORARY.fullmatch(n))
    return Found(path, entries, read_json(path / STATE_FILE) if STATE_FILE in names else None)


def restartable(path: Path) -> bool:
    """Whether ``path`` holds a run posttrain marked as failed or killed before its first checkpoint, with
    nothing else in it and no live owner: a plain start begins it again in place."""
    found = inspect(path)
    if found.state is None or found.state.get("state") == "finished" or found.foreign:
        return False
    if (path / LOCK_FILE).exists() and alive(read_json(path / LOCK_FILE), path / LOCK_FILE):
        return False
    return checkpoint.latest_checkpoint(path, log=lambda _: None) is None and not _round_folders(found)


def _round_folders(found: Found) -> list[str]:
    """Iterative DPO's round folders, in order: its progress, as checkpoints are an offline run's."""
    return sorted((n for n in found.entries if ROUND.fullmatch(n)), key=lambda n: int(n.split("-")[1]))


def _clean_leftovers(path: Path) -> None:
    """Remove the temporary folders and files of writes that a kill interrupted."""
    leftovers = [p for p in path.iterdir() if TEMPORARY.fullmatch(p.name)]
    if (path / "checkpoints").is_dir():
        leftovers += sorted((path / "checkpoints").glob(".step-*"))
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if leftovers:
        log(f"output_dir: {path}: removed {len(leftovers)} unfinished writes of a killed run ({leftovers[0].name} ...)")


def _plan(found: Found, resume: bool) -> tuple[Path | None, bool]:
    """The checkpoint this start resumes (None: step 0), and whether the folder's entries are to be cleared
    first (a run failed or killed before its first checkpoint); ConfigError for a folder a start must not use.
    Changes nothing."""
    path = found.path
    if not found.entries:
        if resume:
            log(f"--resume: {path} holds no run yet; starting one")
        return None, False
    last = checkpoint.latest_checkpoint(path)  # (a damaged one skipped, with a warning on stderr)
    if found.state is None:  # files no posttrain run marked: an older posttrain's run, or not posttrain's
        if resume and last is not None:
            return last, False
        if resume and (path / "metrics.jsonl").exists():
            raise ConfigError(f"--resume: {path} holds a run but no checkpoint (set save_steps to make runs resumable)")
        hint = "pass --resume to continue that run" if last is not None else "empty it"
        raise ConfigError(
            f"output_dir: {path} already holds files that no posttrain run marked as its own "
            f"({', '.join(found.entries[:3])}); {hint} or choose another output_dir"
        )
    if found.foreign:
        raise ConfigError(
            f"output_dir: {path} holds a run that {found.story} and files posttrain did not write "
            f"({', '.join(found.foreign[:3])}); move them or choose another output_dir"
        )
    finished = found.state.get("state") == "finished"
    if last is not None and resume:
        return last, False
    rounds = _round_folders(found)
    if rounds and resume and not finished:
        return None, False  # iterative DPO's rounds: the run resumes round by round (training.iterative)
    if finished and resume:
        raise ConfigError(f"--resume: {path} holds a finished run but no checkpoint (set save_steps to make runs "
                          "resumable)")  # fmt: skip
    if finished:
        raise ConfigError(f"output_dir: {path} already holds files (a finished run); choose another output_dir, "
                          "or remove it to train again")  # fmt: skip
    if last is not None:
        raise ConfigError(
            f"output_dir: {path} already holds files (a run that {found.story} after saving {last.name}); pass "
            "--resume to continue that run or choose another output_dir"
        )
    if rounds:
        raise ConfigError(
            f"output_dir: {path} already holds files (a run that {found.story} in {rounds[-1]}); pass --resume to "
            "continue that run or choose another output_dir"
        )
    kept = [folder.name for _, folder in checkpoint.saved(path)]
    if kept:  # models a restart in place would delete: damaged, or slimmed by keep_resumable
        raise ConfigError(
            f"output_dir: {path} holds a run that {found.story} and checkpoints none of which can be resumed "
            f"({', '.join(kept[-3:])}: damaged, or kept as models only by keep_resumable); choose another "
            "output_dir, or remove it to train again"
        )
    return None, True  # failed or killed before its first checkpoint: start again in place


# ------------------------------------------------------------------------------------------ owning a folder


@dataclass(frozen=True)
class RunFolder:
    path: Path
    checkpoint: Path | None
    """The checkpoint this run continues from; None: it starts at step 0."""


def _take(path: Path) -> Lock | None:
    """The folder created and locked by this process (None: a lock this process holds covers it)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"output_dir: {path} is a file, not a folder") from None
    except OSError as err:
        raise ConfigError(f"output_dir: {path} cannot be created ({err.strerror or err})") from None
    if covered(path):
        return None
    lock = Lock(path)
    lock.acquire()
    return lock


def _first() -> bool:
    """The first process of the job; under torchrun before the processes joined (a pipeline locks its root
    first), the one of rank 0 (torchrun stops the others when it fails)."""
    return distributed.is_main() if distributed.is_initialized() else os.environ.get("RANK", "0") == "0"


def _on_main(work: Callable[[], Any]) -> Any:
    """``work()`` on the first process; its result (or its ConfigError, raised) on every process."""
    if not distributed.is_initialized():
        return work() if _first() else None
    outcome: tuple[str | None, Any] = (None, None)
    if distributed.is_main():
        try:
            outcome = (None, work())
        except ConfigError as err:
            outcome = (str(err), None)
    error, value = distributed.all_gather_objects(outcome)[0]
    if error is not None:
        raise ConfigError(error)
    return value


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock of ``path`` (a pipeline's root: its stages' folders are covered by it), SIGTERM a
    request to stop meanwhile (:mod:`posttrain.training.stopping`)."""
    created = not path.exists()
    held: list[Lock | None] = []
    _on_main(lambda: held.append(_take(path)))
    try:
        with stopping.watching(f"the pipeline in {path}"):
            yield
    finally:
        if held and held[0] is not None:
            held[0].release()
        if created and _first():
            with contextlib.suppress(OSError):
                path.rmdir()  # nothing was written in it


@contextlib.contextmanager
def claim(path: Path, resume: bool) -> Iterator[RunFolder]:
    """Own run folder ``path`` for the block: locked, its state ``running``, its start decided (a new run, a
    restart in place, or the checkpoint to resume); ``finished``, ``stopped`` or ``failed`` when the block
    ends. SIGTERM is a request to stop meanwhile (:mod:`posttrain.training.stopping`): one that no step
    boundary served raises :class:`~posttrain.training.stopping.Stopped` once the folder says ``finished``."""
    with stopping.watching(f"the run in {path}"), _claimed(path, resume) as folder:
        yield folder


@contextlib.contextmanager
def _claimed(path: Path, resume: bool) -> Iterator[RunFolder]:
    """:func:`claim` but the stop request.

    Called by every process of a job; the first one does the work. Input refused inside the block
    (ConfigError, DataError) leaves the folder's story as it was; a folder this call created is removed
    again when nothing but the state file was written in it."""
    created = not path.exists()
    held: dict[str, Any] = {}

    def start() -> str | None:
        held["lock"] = _take(path)
        try:
            found = inspect(path)
            last, restart = _plan(found, resume)
            _clean_leftovers(path)
            if restart:
                for name in found.entries:
                    shutil.rmtree(path / name) if (path / name).is_dir() else (path / name).unlink()
                log(
                    f"output_dir: {path}: the previous run {found.story} before its first checkpoint; starting it again"
                )
            held["previous"] = found.state
            write_json(path / STATE_FILE, {"state": "running", "host": socket.gethostname(), "pid": os.getpid(),
                                            "started": _now(), "resumed_from": last and last.name})  # fmt: skip
        except BaseException as err:
            if held["lock"] is not None:
                held["lock"].release()
            if isinstance(err, OSError):
                raise ConfigError(f"output_dir: {path}: {err}") from None
            raise
        return None if last is None else str(last)

    last = _on_main(start)
    try:
        yield RunFolder(path, None if last is None else Path(last))
    except BaseException as err:
        if distributed.is_main():
            _ended(path, err, held.get("previous"), resumed=last is not None)
        raise
    else:
        if distributed.is_main():
            state = read_json(path / STATE_FILE) or {}
            write_json(path / STATE_FILE, {**state, "state": "finished", "ended": _now()})
    finally:
        if held.get("lock") is not None:
            held["lock"].release()
        if created and distributed.is_main() and not (path / STATE_FILE).exists():
            with contextlib.suppress(OSError):
                path.rmdir()


def _ended(path: Path, err: BaseException, previous: dict[str, Any] | None, resumed: bool) -> None:
    """The state a failed block leaves: the one before it for input refused by a resume (a changed config or
    data) or a finished run's, none when nothing was written, else ``failed`` with the error's first line."""
    refused = isinstance(err, (ConfigError, DataError))
    with contextlib.suppress(OSError):
        if isinstance(err, stopping.Stopped):  # (the step: where this folder's own loop stopped)
            step = err.step if err.checkpoint is not None and err.checkpoint.parent.parent == path else None
            state = read_json(path / STATE_FILE) or {}
            write_json(path / STATE_FILE, {**state, "state": "stopped", "signal": err.signal_name, "step": step,
                                            "ended": _now()})  # fmt: skip
        elif refused and previous is not None and (resumed or previous.get("state") == "finished"):
            write_json(path / STATE_FILE, previous)
        elif not inspect(path).entries:
            (path / STATE_FILE).unlink(missing_ok=True)
        else:
            first = (str(err).strip().splitlines() or [""])[0]
            state = read_json(path / STATE_FILE) or {}
            write_json(path / STATE_FILE, {**state, "state": "failed", "ended": _now(),
                                            "error": f"{type(err).__name__}: {first}"[:300]})  # fmt: skip


# ------------------------------------------------------------------------------- what a resume must match


def data_digest(records: Sequence[Any]) -> str:
    """A digest of a split: the token ids hashed for the reference cache, and every other field but the
    position (labels, margins, the columns handed to rewards)."""
    rest = [{f.name: getattr(r, f.name) for f in dataclasses.fields(r)
             if f.name != "index" and not isinstance(getattr(r, f.name), tuple)} for r in records]  # fmt: skip
    h = hashlib.blake2b(records_digest(records).encode(), digest_size=16)
    h.update(json.dumps(rest, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprints(model: nn.Module | None, splits: Mapping[str, Sequence[Any]]) -> dict[str, str]:
    """What a checkpoint's run trained: ``data.SPLIT`` digests and the starting weights' (``model``)."""
    out = {f"data.{name}": data_digest(records) for name, records in splits.items() if records}
    if model is not None:
        out["model"] = weights_digest(model)
    return out


def check_fingerprints(saved: dict[str, str] | None, current: dict[str, str], config: TrainConfig) -> None:
    """Refuse a resume whose data or starting model differ from the checkpoint's (one line naming them).
    A checkpoint of an older posttrain holds none: nothing to compare."""
    changed = [k for k in current if saved and k in saved and saved[k] != current[k]]
    if not saved or not changed:
        return
    paths = {"model": config.model, "data.train": config.data.train, "data.eval": config.data.eval or "held out"}
    named = ", ".join(f"{'the starting model' if k == 'model' else k} ({paths.get(k)})" for k in changed)
    raise ConfigError(
        f"--resume: {named} changed since the checkpoint was saved (fingerprint {saved[changed[0]][:12]} -> "
        f"{current[changed[0]][:12]}); resuming would continue another run: restore it, or start a new run"
    )


def _roots(old: Any, new: Any) -> tuple[str, str] | None:
    """The folders a run folder moved between: ``old`` and ``new`` output_dir less their common last names
    (a pipeline's stage keeps its name: its root moved)."""
    if not isinstance(old, str) or not isinstance(new, str) or old == new:
        return None
    a, b = Path(old).parts, Path(new).parts
    while len(a) > 1 and len(b) > 1 and a[-1] == b[-1]:
        a, b = a[:-1], b[:-1]
    return str(Path(*a)), str(Path(*b))


def _same(saved: Any, now: Any, roots: tuple[str, str] | None) -> bool:
    """Equal, or equal once a path inside the old folder is read as the same path inside the new one."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return saved.keys() == now.keys() and all(_same(saved[k], now[k], roots) for k in saved)
    if isinstance(saved, list) and isinstance(now, list):
        return len(saved) == len(now) and all(_same(a, b, roots) for a, b in zip(saved, now, strict=True))
    if saved == now:
        return True
    if roots is None or not isinstance(saved, str):
        return False
    old, new = roots
    inside = saved == old or saved.startswith(old.rstrip(os.sep) + os.sep)
    return inside and new + saved[len(old) :] == now


def write_config(output_dir: Path, config: TrainConfig) -> None:
    """Write the run's ``config.yaml`` (the first process only): what ``posttrain eval``, ``report`` and a
    resume read back."""
    if distributed.is_main():
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_changes(saved: dict[str, Any], current: dict[str, Any], may_change: frozenset[str]) -> list[str]:
    """``KEY: saved -> current`` for every key (but ``may_change``) whose value differs. A moved folder is no
    change: ``output_dir``, and paths inside the folder that saved the run, compare as their counterparts in
    the current one (:func:`_roots`)."""
    roots = _roots(saved.get("output_dir"), current.get("output_dir"))
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in may_change and not _same(saved.get(key), current.get(key), roots)
    ]
