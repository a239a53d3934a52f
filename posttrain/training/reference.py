"""Reference log-probs for the offline methods, pairs (the DPO family) and unpaired rows (KTO) alike.

A reference is a frozen model scored every step (``reference.kind: copy``; with LoRA, the policy itself with
its adapters off), per-record log-probs computed once and cached on disk (``cached``), or none. The classes
are the same for both kinds of records; what differs is how a batch is scored (the task's ``score``: a pair's
chosen and rejected sums, or a row's sum) and so which tables a cache holds and how a batch reads them:
``chosen``/``rejected`` per pair (:func:`read_pairs`), ``completion``/``kl`` per unpaired row, ``kl`` being
its prompt with its KL partner's completion (:func:`read_unpaired`).

The cache is keyed by a fingerprint of everything that determines the numbers: the reference weights
(every tensor's name, dtype, shape and bytes), the token ids of the data (which already encode the data
file, the tokenizer, the chat template and the truncation settings), the precision and a format version.
Any change recomputes; an identical rerun, a later epoch or a resumed run reuses the file. Files are
written to a temporary name and renamed, so a killed run never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from posttrain.data.collate import PairBatch, collate_pairs
from posttrain.data.examples import PreferenceRecord, UnpairedRecord
from posttrain.data.unpaired import UnpairedBatch, collate_unpaired
from posttrain.host import to_device
from posttrain.model.load import evaluation_mode
from posttrain.model.logps import PairLogps
from posttrain.training import checkpoint

CACHE_FORMAT = "posttrain-reference-logps-v1"

B = TypeVar("B")  # a batch: PairBatch or UnpairedBatch
B_in = TypeVar("B_in", contravariant=True)
L_out = TypeVar("L_out", covariant=True)
R = TypeVar("R")  # a record: PreferenceRecord or UnpairedRecord


class _Detachable(Protocol):
    def detach(self: D) -> D: ...


D = TypeVar("D", bound=_Detachable)  # what a score returns: PairLogps, or a (B,) Tensor
L = TypeVar("L")


class Reference(Protocol[B_in, L_out]):
    def logps(self, batch: B_in) -> L_out:
        """Reference summed log-probs of the batch (a pair's ``PairLogps``, a row's (B,) sums), or None
        without a reference."""
        ...


class NoReference:
    def logps(self, batch: object) -> None:
        return None


class FrozenReference(Generic[B, D]):
    """A frozen model scored under ``torch.no_grad`` every step.

    ``context`` (optional) wraps each scoring: with LoRA the reference is the policy itself under
    ``disable_adapter()``, so the frozen "copy" costs no memory.
    """

    def __init__(
        self,
        model: nn.Module,
        score: Callable[[nn.Module, B], D],
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.model = model
        self.score = score
        self.context = context

    def logps(self, batch: B) -> D:
        with torch.no_grad(), evaluation_mode(self.model), self.context():
            return self.score(self.model, batch).detach()


class CachedReference(Generic[B, L]):
    """Precomputed per-record reference log-probs (named (N,) float32 tables), looked up by the batch's data
    set indices through ``read`` (:func:`read_pairs`, :func:`read_unpaired`)."""

    def __init__(self, tables: dict[str, Tensor], read: Callable[[dict[str, Tensor], B], L]) -> None:
        self.tables = tables
        self.read = read

    def to(self, device: torch.device) -> CachedReference[B, L]:
        return CachedReference({k: t.to(device) for k, t in self.tables.items()}, self.read)

    def logps(self, batch: B) -> L:
        return self.read(self.tables, batch)


def read_pairs(tables: dict[str, Tensor], batch: PairBatch) -> PairLogps:
    """The batch's pairs from the ``chosen`` and ``rejected`` tables, with their completion lengths."""
    chosen, rejected = tables["chosen"], tables["rejected"]
    device = chosen.device
    counts = to_device(batch.completion_counts(), device)
    n = batch.num_pairs
    i = to_device(batch.index, device)
    return PairLogps(chosen[i], rejected[i], counts[:n], counts[n:])


def read_unpaired(tables: dict[str, Tensor], batch: UnpairedBatch) -> Tensor:
    """(B,) the batch's rows from ``completion`` (prompt_i + completion_i) or, for a ``kl`` batch, from ``kl``
    (prompt_i + completion_partner(i))."""
    table = tables["kl"] if batch.kl else tables["completion"]
    return table[to_device(batch.index, table.device)]


_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}


def _base_name(name: str) -> str | None:
    """The plain-model name of a tensor of a LoRA-wrapped model; None for the adapters themselves."""
    if "lora_" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def weights_digest(model: nn.Module) -> str:
    """A digest of every tensor of the model (names, dtypes, shapes and bytes).

    Adapters are left out and LoRA-wrapped names mapped back, so a LoRA run's base weights (its
    adapter-disabled reference) share their digest, and so their cache, with the plain model.
    """
    h = hashlib.blake2b(digest_size=16)
    # The architecture settings too (soft-capping, RoPE, sliding window change log-probs for the same
    # weights); not where the model was loaded from, nor the library version that saved it.
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    named = ((_base_name(n), t) for n, t in model.state_dict().items())
    for name, tensor in sorted((n, t) for n, t in named if n is not None):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 1-D: a 0-dim tensor cannot be viewed
    return h.hexdigest()


def records_digest(records: Sequence[Any]) -> str:
    """A digest of every record's type and token-id fields (its tuple fields, in declaration order).

    Works for any frozen record dataclass (pairs, unpaired examples with their KL partner's completion);
    fields that do not change log-probs (``index``, labels, margins) are not tuples and are left out.
    """
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(f"{type(r).__name__}|".encode())
        for f in dataclasses.fields(r):
            ids = getattr(r, f.name)
            if isinstance(ids, tuple):
                h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
                h.update(b"|")
        h.update(b"\n")
    return h.hexdigest()


def fingerprint(weights: str, records: Sequence[Any], precision: str) -> str:
    key = f"{CACHE_FORMAT}|{weights}|{records_digest(records)}|{precision}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def reference_pass(
    records: Sequence[R],
    batch_size: int,
    names: Sequence[str],
    score_chunk: Callable[[Sequence[R]], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """One no-grad pass over ``records`` in chunks of ``batch_size``: each named table (N,) float32, in
    ``records`` order, from ``score_chunk``'s (n,) log-probs of each chunk."""
    out = {name: torch.empty(len(records)) for name in names}
    starts = range(0, len(records), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="reference log-probs", unit="batch", leave=False, dynamic_ncols=True):
            chunk = records[start : start + batch_size]
            for name, values in score_chunk(chunk).items():
                # By position in ``records`` (a process's share of a split starts anywhere in it).
                out[name][start : start + len(chunk)] = values.float().cpu()
    return out


def compute_pair_logps(
    score: Callable[[nn.Module, PairBatch], PairLogps],
    model: nn.Module,
    records: Sequence[PreferenceRecord],
    pad_id: int,
    batch_size: int,
    layout: str = "padded",
) -> dict[str, Tensor]:
    """``chosen`` and ``rejected`` summed log-probs, each (N,), in batches of ``batch_size`` pairs laid out in
    ``layout`` (one concatenated forward per batch)."""

    def chunk(part: Sequence[PreferenceRecord]) -> dict[str, Tensor]:
        out = score(model, collate_pairs(part, pad_id, layout))
        return {"chosen": out.chosen_logps, "rejected": out.rejected_logps}

    return reference_pass(records, batch_size, ("chosen", "rejected"), chunk)


def compute_unpaired_logps(
    score: Callable[[nn.Module, UnpairedBatch], Tensor],
    model: nn.Module,
    records: Sequence[UnpairedRecord],
    pad_id: int,
    batch_size: int,
    layout: str = "padded",
) -> dict[str, Tensor]:
    """``completion`` and ``kl`` summed log-probs, each (N,): two batches per chunk (own completions, then
    the KL partners')."""

    def chunk(part: Sequence[UnpairedRecord]) -> dict[str, Tensor]:
        names = ("completion", "kl")
        return {name: score(model, collate_unpaired(part, pad_id, name == "kl", layout)) for name in names}

    return reference_pass(records, batch_size, ("completion", "kl"), chunk)


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.safetensors"


def cached_tensors(
    cache_dir: Path,
    key: str,
    compute: Callable[[], dict[str, Tensor]],
    log: Callable[[str], None] = print,
    reuse: bool = True,
) -> dict[str, Tensor]:
    """Load the named tensors cached for ``key``, or compute and store them (written to a temporary name,
    then renamed, so a killed run never leaves a half-written file under the final name). ``reuse=False``
    computes even when the file exists (processes that must compute together, see OfflineTask). A write that
    fails is retried like a checkpoint's; if it still fails (a full disk), the run goes on with the tensors it
    holds and says so: the cache only saves the next run the reference pass."""
    path = cache_path(cache_dir, key)
    if reuse and path.exists():
        tensors = load_file(str(path))
        log(f"reference log-probs: reused cache {path}")
        return tensors
    tensors = compute()
    try:
        checkpoint.retried(path, lambda: _store(tensors, path))
    except checkpoint.WriteError as err:
        print(
            f"posttrain: warning: {path}: reference log-probs not cached ({err.__cause__}); the run goes on "
            "with them in memory",
            file=sys.stderr,
        )
        return tensors
    log(f"reference log-probs: computed and cached at {path}")
    return tensors


def _store(tensors: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: processes on several nodes may write to one shared disk with equal pids.
    tmp = path.with_suffix(f".tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata={"format": CACHE_FORMAT})
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
