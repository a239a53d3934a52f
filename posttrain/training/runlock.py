"""The lock of a run folder (``posttrain.lock``): which run owns the folder, and whether it is still alive.

Taken atomically (``O_CREAT | O_EXCL``) by the first process of a job (:mod:`posttrain.training.rundir`
decides when), holding the host, the pid, the process's start time and a heartbeat. A daemon thread rewrites
the heartbeat every :data:`HEARTBEAT_S` seconds, so it stays fresh while a model loads or a reference cache is
built (no logged step for a long time), and stops with the process, however it ends. A lock is stale when
its process is gone: on the same machine (host name, boot and pid namespace) its pid is dead or now belongs to
a later process; seen from another machine (a shared disk), its heartbeat is older than :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from posttrain.errors import ConfigError

LOCK_FILE = "posttrain.lock"
HEARTBEAT_S = 30.0
"""How often the owner of a lock rewrites its heartbeat."""
STALE_AFTER_S = 600.0
"""A lock held from another machine is stale when its heartbeat is older than this."""

_held: dict[Path, Lock] = {}  # the locks this process holds: a folder inside one of them is covered by it


def log(line: str) -> None:
    tqdm.write(line)


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` to a temporary name beside ``path`` and rename it: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _machine() -> str:
    """Where a pid means this process table: the host name, the boot and the pid namespace (containers on one
    host share a host name at times, never a pid namespace)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux clock ticks since boot), telling a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(owner: dict[str, Any] | None, path: Path) -> bool:
    """Whether the run that wrote lock ``owner`` may still be running."""
    if owner is None:  # being written this instant, or a crash between create and write
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime < 60
        return False
    if owner.get("machine") == _machine():
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except (PermissionError, OverflowError, ValueError):
            pass  # exists (another user's), or not a pid at all: judged by its start time below
        start = _process_start(pid)
        return start is None or owner.get("process_start") in (None, start)
    return time.time() - float(owner.get("heartbeat", 0)) < STALE_AFTER_S


class Lock:
    """The lock file of one run folder, held by this process (:meth:`acquire` ... :meth:`release`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self.since = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "machine": _machine(), "process_start": _process_start(pid),
                "since": self.since, "heartbeat": time.time()}  # fmt: skip

    def _mine(self, owner: dict[str, Any] | None) -> bool:
        return owner is not None and owner.get("pid") == os.getpid() and owner.get("machine") == _machine()

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; ConfigError (one line) while another run holds it."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_json(self.path)
                if alive(owner, self.path):
                    raise ConfigError(in_use(self.folder, owner)) from None
                self._break(owner)
                continue
            except OSError as err:  # read-only, a file in the way, no permission
                raise ConfigError(f"output_dir: {self.folder} is not writable ({err.strerror or err})") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self._content()))
            self._thread = threading.Thread(target=self._beat, name="posttrain-heartbeat", daemon=True)
            self._thread.start()
            _held[self.folder.resolve()] = self
            return
        raise ConfigError(in_use(self.folder, read_json(self.path)))

    def _break(self, owner: dict[str, Any] | None) -> None:
        """Remove a stale lock: renamed aside first (one process wins the rename), removed only if it is
        still the lock judged stale (not one a third run took in between, which is put back)."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_json(aside) != owner:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = f"host {owner.get('host')}, pid {owner.get('pid')}" if owner else "unreadable lock"
        log(f"output_dir: {self.folder}: the run that held it ({who}) is gone; taking it over")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                if not self._mine(read_json(self.path)):
                    return  # taken over (judged stale by another machine): stop writing to it
                write_json(self.path, self._content())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _held.pop(self.folder.resolve(), None)
        if self._mine(read_json(self.path)):
            self.path.unlink(missing_ok=True)


def in_use(folder: Path, owner: dict[str, Any] | None) -> str:
    if owner is None:
        return f"output_dir: {folder} is in use by another run (its lock is being written); choose another output_dir"
    since = datetime.datetime.fromtimestamp(float(owner.get("since", 0))).isoformat(sep=" ", timespec="seconds")
    age = time.time() - float(owner.get("heartbeat", 0))
    return (
        f"output_dir: {folder} is in use by another run (host {owner.get('host')}, pid {owner.get('pid')}, since "
        f"{since}, last heartbeat {age:.0f} s ago); wait for it to end or choose another output_dir"
    )


def covered(folder: Path) -> bool:
    """Whether a lock this process holds covers ``folder`` (a pipeline's stage, an iterative DPO round)."""
    path = folder.resolve()
    return any(held in path.parents for held in _held)
