"""An iterative-DPO run's first round, shared by the runs that would sample the very same one.

Round 1 samples the starting model, so its pairs depend on that model, the prompts, the sampling and the
reward, and not on what the run then trains (beta, the loss, the learning rate, the number of rounds). Inside
:func:`shared_first_rounds` (``posttrain frontier`` opens it on ``OUTPUT_DIR/frontier/rounds``) a run whose
first round's key is already in the folder copies that round's ``pairs.jsonl`` and ``round.json`` instead of
sampling again, and a run that samples one leaves it there. So a frontier's offline-DPO curve, one run per
beta, trains every beta on the same pairs, as the DPO paper's sentiment frontier does (Rafailov et al. 2023,
Sec. 6.1: one preference set, several betas), and the sampling (18 minutes for 300 openings x 8 samples of
SmolLM2-135M on 2 CPU cores) is paid once per curve; the online-DPO runs of a curve share their first round.

The key is a digest of the run's config without the keys that only decide the training (a key left in can
only cost a reuse, never give a run pairs it would not have sampled), the starting weights' digest (a model
folder retrained under the same path is another model) and the number of processes (each samples its
share with its own seed).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from posttrain import distributed
from posttrain.config import TrainConfig
from posttrain.training import checkpoint, rundir
from posttrain.training.reference import weights_digest

_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("first_rounds", default=None)

# What the training after round 1 reads, and where and how often it writes: none changes round 1's pairs.
TRAINING_ONLY = frozenset(
    {"output_dir", "beta", "loss", "rpo_alpha", "reference_update", "rounds", "steps_per_round", "reference", "lora",
     "max_steps", "epochs", "batch_size", "micro_batch_size", "learning_rate", "lr_scheduler", "warmup_ratio",
     "weight_decay", "adam_betas", "adam_eps", "max_grad_norm", "skip_nonfinite_steps", "logps_chunk_size",
     "gradient_checkpointing", "layout", "compile", "span_attention", "eval_steps", "save_steps",
     "keep_resumable", "logging_steps", "log_completions", "report_to"}
)  # fmt: skip
FILES = ("pairs.jsonl", "round.json")  # round.json last: a round with it has all its pairs
PAIRS_FORMAT = 2  # part of the key: 2, the rows carry ``margin`` (a round kept by older code is not reused)


@contextlib.contextmanager
def shared_first_rounds(folder: Path) -> Iterator[None]:
    """Inside, iterative runs keep their first round in ``folder`` and reuse one with their key."""
    token = _FOLDER.set(folder)
    try:
        yield
    finally:
        _FOLDER.reset(token)


def key(config: TrainConfig, weights: str, data: str) -> str:
    """The digest that names a first round: ``config`` without :data:`TRAINING_ONLY`, ``weights`` (the
    starting model's digest), ``data`` (the prompts' digest: a file edited under the same name is other
    data), the number of processes and :data:`PAIRS_FORMAT`."""
    kept = {k: v for k, v in config.to_dict().items() if k not in TRAINING_ONLY}
    text = json.dumps({"config": kept, "weights": weights, "data": data, "processes": distributed.world_size(),
                       "format": PAIRS_FORMAT}, sort_keys=True, default=str)  # fmt: skip
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def name_of(config: TrainConfig, policy: nn.Module, prompts: Sequence[Any]) -> str | None:
    """The key of the first round ``policy`` (the starting model) would sample from ``prompts`` (the
    training and held-out ones); None outside :func:`shared_first_rounds` (nothing hashed)."""
    if _FOLDER.get() is None:
        return None
    return key(config, weights_digest(policy), rundir.data_digest(prompts))


def reuse(name: str, round_dir: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Copy the shared first round ``name`` into ``round_dir`` and return its figures (every process, once
    the files are there); None where the open folder holds no such round."""
    folder = _FOLDER.get()
    assert folder is not None, "a name comes from name_of, inside shared_first_rounds"
    source = folder / name
    if not (source / FILES[-1]).is_file():
        return None
    if distributed.is_main():
        round_dir.mkdir(parents=True)
        for file in FILES:  # each through a temporary name: a kill never leaves half a round.json
            shutil.copyfile(source / file, round_dir / f".{file}.tmp")
            (round_dir / f".{file}.tmp").replace(round_dir / file)
    distributed.barrier()
    info = dict(json.loads((round_dir / FILES[-1]).read_text()))
    log(f"round 1: pairs reused from {source} (sampled by a run with the same starting model, prompts, "
        "sampling and rewards)")  # fmt: skip
    return info


def keep(name: str, round_dir: Path, log: Callable[[str], None]) -> None:
    """Leave the first round just written in ``round_dir`` under ``name`` (main process; written as a
    checkpoint is, :func:`checkpoint.write_atomically`, so that a reader never sees half of one). Sharing
    saves time and no more: a copy that fails (a full disk) is said in one line and the run goes on with its
    own round."""
    folder = _FOLDER.get()
    if folder is None or not distributed.is_main() or (folder / name).exists():
        return

    def copy(tmp: Path) -> None:
        for file in FILES:
            shutil.copyfile(round_dir / file, tmp / file)

    try:
        checkpoint.write_atomically(folder / name, copy)
    except checkpoint.WriteError as err:
        log(f"round 1: not kept for the grid's other runs ({err}); they will sample their own")
