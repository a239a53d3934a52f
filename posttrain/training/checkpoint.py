"""Checkpoints: HF-format models (loadable with no posttrain import) and the resumable training state.

Layout of ``output_dir``::

    model/                      the final model and tokenizer (safetensors)
    checkpoints/step-000020/    a model + tokenizer, and the trainer state (optimizer, scheduler, RNG, step):
                                trainer_state.safetensors (its tensors) + trainer_state.json (the rest)
    metrics.jsonl  config.yaml  summary.json  run_state.json  posttrain.lock   (posttrain.training.rundir)

The final model and the checkpoint of the last step hold the same weights: they are one file under two names
(a hard link, :func:`share_weights`), as is an iterative run's ``model/`` and its last round's.

The layout does not depend on the number of processes: the first process writes full (unsharded) models
and optimizer state, so a run saved by N processes resumes on M (docs/distributed.md).

Every directory is written under a temporary name and renamed when complete, so a run killed mid-save
never leaves a checkpoint that ``--resume`` would pick up half written; a write that fails (a full disk, a
lost mount) is tried again after a pause, then stops the run with one line (:class:`WriteError`).

The trainer state holds no pickle: tensors go to safetensors, everything else to JSON, and
``trainer_state.json`` (written last) lists every file of the checkpoint with its size, so a file truncated
since (a copy cut short, a damaged disk) is seen and the checkpoint skipped for the previous one. A
checkpoint of an older posttrain (``trainer_state.pt``) still loads, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posttrain.errors import ConfigError

T = TypeVar("T")

STATE_FILE = "trainer_state.json"
"""The trainer state's plain values and the checkpoint's file list; written last, it marks a checkpoint complete."""
TENSORS_FILE = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"
"""The pickled trainer state of earlier posttrain versions: still read, never executed (``weights_only=True``)."""
STOP_MARK = "stopped_here.json"
"""In a checkpoint written by a stop (SIGTERM, :mod:`posttrain.training.stopping`): removed by
:func:`drop_stops` once the resumed run has finished; it outlives :func:`slim`."""
STEP_DIR = re.compile(r"step-(\d+)")  # a checkpoint's folder, checkpoints/step-000040

RETRY_DELAYS_S = (10.0, 60.0)
"""Pauses before the second and third try of a failed write (time to free disk space, a mount to return)."""


class WriteError(RuntimeError):
    """A model or checkpoint could not be written, even after the retries; the message is one line."""


def failed_write(err: BaseException) -> bool:
    """Whether ``err`` says a file could not be written (a full disk, a lost mount): an OSError, or the error
    safetensors raises for one, which is not an OSError (``SafetensorError: Error while serializing: I/O
    error: No space left on device (os error 28)``, the weights of every model and checkpoint)."""
    return isinstance(err, OSError) or (isinstance(err, SafetensorError) and "I/O error" in str(err))


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then rename ``tmp_dir`` to ``target`` (replacing an older one), with
    :func:`retried`'s tries."""
    return retried(target, lambda: _write_once(target, write))


def retried(target: Path, attempt: Callable[[], T]) -> T:
    """``attempt()``, which writes ``target``; a failed write (:func:`failed_write`) is tried again after
    each of :data:`RETRY_DELAYS_S`, then raised as a one-line :class:`WriteError`. ``attempt`` must leave
    nothing half written when it fails (a temporary name, removed)."""
    for tries, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
        try:
            return attempt()
        except (OSError, SafetensorError) as err:
            if not failed_write(err):
                raise
            if delay is None:
                raise WriteError(
                    f"{target}: not written after {tries} tries ({err}); what it would have held is lost unless an "
                    "earlier checkpoint holds it (save_steps): free space or fix the folder, then rerun or --resume"
                ) from err
            print(f"posttrain: warning: writing {target} failed ({err}); trying again in {delay:g} s", file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _write_once(target: Path, write: Callable[[Path], None]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


WEIGHTS_SUFFIX = ".safetensors"
"""The files that :func:`share_weights` links: a model's weights, the bulk of every model folder."""


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """``target`` as a second name of ``source``'s file when it holds a model's weights (a hard link: no bytes
    written, none stored twice), a copy otherwise or where the folder cannot link (another disk, a file system
    without links). Safe because posttrain never writes a file in place: it writes a new folder and renames it
    (:func:`write_atomically`), so replacing one name leaves the other's bytes as they were."""
    if str(source).endswith(WEIGHTS_SUFFIX):
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def share_weights(folder: Path, same: Path | None) -> int:
    """Each weight file of ``folder`` (one being written) whose bytes equal the file of that name in ``same`` (a
    folder written from the same model: the final model beside the checkpoint of the last step), made a hard
    link to it; returns the bytes no longer stored twice. Compared byte for byte, so a file that differs (a
    LoRA model saved merged beside its adapter checkpoint) stays as written; where linking fails both stay."""
    if same is None:
        return 0
    saved = 0
    for file in sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")):
        other = same / file.name
        if not other.is_file() or other.stat().st_size != file.stat().st_size:
            continue
        if not filecmp.cmp(file, other, shallow=False):
            continue
        linked = file.with_name(f".{file.name}.link")
        try:
            os.link(other, linked)
        except OSError:
            continue
        os.replace(linked, file)
        saved += file.stat().st_size
    return saved


def save_model(model: Any, tokenizer: Any, target: Path) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return write_atomically(target, write)


def step_dir(output_dir: Path, step: int) -> Path:
    """The folder of the checkpoint after ``step`` optimizer steps: ``checkpoints/step-000040``."""
    return output_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    extra: dict[str, Any],
    keep_resumable: int | None = None,
    same: Path | None = None,
    stop: bool = False,
) -> Path:
    """Model, tokenizer and the full training state after ``step`` optimizer steps.

    ``optimizer_state``: the FULL state in torch's layout (:func:`posttrain.distributed.optimizer_state`),
    whatever the number of processes that trained: any number can resume it. Written by one process.
    ``keep_resumable``: once it is written, only the newest N checkpoints keep their state (:func:`slim`).
    ``same``: a model folder just written from the same weights (the final model): weight files equal to its
    own are stored once (:func:`share_weights`). ``stop``: written by a stop (:data:`STOP_MARK`)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        share_weights(tmp, same)
        if stop:
            (tmp / STOP_MARK).write_text(json.dumps({"step": step}), encoding="utf-8")
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            **rng_state(),
            **extra,
        }
        save_state(tmp, state)

    written = write_atomically(step_dir(output_dir, step), write)
    if keep_resumable is not None:
        slim(output_dir, keep_resumable)
    return written


def saved(output_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoint folders of a run (``checkpoints/step-N``, written whole: see :func:`write_atomically`),
    by step number, oldest first; resumable or slimmed, damaged or not."""
    root = output_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def resumable(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a training state (it may still be damaged: :func:`damage`)."""
    return (checkpoint / STATE_FILE).exists() or (checkpoint / LEGACY_STATE_FILE).exists()


def slim(output_dir: Path, keep: int) -> list[Path]:
    """Drop the training state (optimizer moments, scheduler, RNG; PPO's critic) of every checkpoint older than
    the newest ``keep`` undamaged resumable ones; they keep their model and tokenizer, a loadable model and a
    frontier point, and ``--resume`` no longer sees them. A damaged checkpoint newer than those is left as it
    is. The state file goes first, so a kill part way leaves a model folder, never a checkpoint that looks
    resumable; the next call finishes it. Returns the checkpoints slimmed now. For a full fine-tune with
    AdamW the state is ~4/5 of a checkpoint."""
    kept, slimmed = 0, []
    for _, path in reversed(saved(output_dir)):
        if kept < keep:
            kept += resumable(path) and damage(path) is None
            continue
        present = [path / name for name in (STATE_FILE, LEGACY_STATE_FILE, TENSORS_FILE) if (path / name).exists()]
        for file in present:
            file.unlink()
        if present:
            slimmed.append(path)
    return slimmed


def drop_stops(output_dir: Path) -> list[Path]:
    """Remove the checkpoints that stops wrote (:data:`STOP_MARK`), at the end of a finished run: the folder
    then holds the checkpoints an uninterrupted run writes. Returns those removed."""
    dropped = [path for _, path in saved(output_dir) if (path / STOP_MARK).exists()]
    for path in dropped:
        shutil.rmtree(path)
    if dropped and not any((output_dir / "checkpoints").iterdir()):
        (output_dir / "checkpoints").rmdir()  # a run without save_steps: none, as uninterrupted
    return dropped


def save_state(directory: Path, state: dict[str, Any]) -> None:
    """``state`` as ``trainer_state.safetensors`` (every tensor) and ``trainer_state.json`` (the rest, with
    the size of every file already in ``directory``): no pickle, so loading runs no code."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(state, tensors, set())
    save_file(tensors, str(directory / TENSORS_FILE))
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    text = json.dumps({"format": 1, "files": files, "state": plain})
    (directory / STATE_FILE).write_text(text, encoding="utf-8")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """JSON values for ``obj``: tensors replaced by ``{"__tensor__": key}`` (stored in ``tensors``), tuples and
    dicts with keys other than strings tagged so that they come back as they were."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, storages) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, storages) for v in obj]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state: {type(obj).__name__} is not a tensor or a plain value; it cannot be saved")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def damage(checkpoint: Path) -> str | None:
    """What makes a complete-looking checkpoint unusable (a file missing or of another size than written,
    a state file that does not parse), or None when it is whole. Reads sizes and headers, not the weights."""
    state = checkpoint / STATE_FILE
    if not state.exists():
        legacy = checkpoint / LEGACY_STATE_FILE  # no file list: safetensors headers and the zip directory
        if not zipfile.is_zipfile(legacy):
            return f"{LEGACY_STATE_FILE}: truncated or not a torch.save file"
        for path in sorted(checkpoint.glob("*.safetensors")):
            expected = _safetensors_size(path)
            if expected != path.stat().st_size:
                return f"{path.name}: {path.stat().st_size} bytes, its header describes {expected}"
        return None
    try:
        files = json.loads(state.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{STATE_FILE}: unreadable ({type(err).__name__}: {err})"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != size:
            return f"{name}: {path.stat().st_size} bytes, {size} written"
    return None


def _safetensors_size(path: Path) -> int | None:
    """The file size a safetensors header describes (8 + header + data), or None when unreadable."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def latest_checkpoint(output_dir: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The complete and undamaged checkpoint with the highest step, or None; a damaged one is skipped for
    the one before it, with a warning (to stderr unless ``log`` is given)."""
    for _, path in reversed(saved(output_dir)):
        if not resumable(path):
            continue
        why = damage(path)
        if why is None:
            return path
        line = f"posttrain: warning: checkpoint {path} is damaged ({why}); using the one before it"
        (log or (lambda s: print(s, file=sys.stderr)))(line)
    return None


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of ``checkpoint``: safetensors + JSON, or an older posttrain's ``trainer_state.pt``
    read with ``weights_only=True`` (a file holding anything but tensors and plain values is refused)."""
    if (checkpoint / STATE_FILE).exists():
        saved = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        state: dict[str, Any] = _decode(saved["state"], load_file(str(checkpoint / TENSORS_FILE)))
        return state
    legacy = checkpoint / LEGACY_STATE_FILE
    try:
        state = torch.load(legacy, weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"--resume: {legacy} holds objects other than tensors and plain values; it was not loaded (no code "
            "from it ran): a file posttrain did not write? resume from another checkpoint or start a new run"
        ) from None
    return state


def rng_state() -> dict[str, Any]:
    """The generators a resumed run continues from: torch's CPU one, Python's, and, once this process has used
    CUDA, every visible GPU's (``cuda``: a list of uint8 tensors, ``torch.cuda.get_rng_state_all``)."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_initialized():  # (asking an unused CUDA for its state would start it)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back :func:`rng_state`'s generators. CUDA states go to the GPUs this process sees (the first ones
    when it sees fewer than the saving process); a checkpoint without them (written on a CPU) leaves the GPUs'
    generators as the run's seed set them. With several processes every process takes the first one's states,
    as it does for the CPU generator."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(cuda)[: torch.cuda.device_count()])
