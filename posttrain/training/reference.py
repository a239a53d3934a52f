"""Reference log-probs for the DPO family: a frozen copy, a disk cache, or none.

The cache is keyed by a fingerprint of everything that determines the numbers: the reference weights
(every tensor's name, dtype, shape and bytes), the token ids of the data (which already encode the data
file, the tokenizer, the chat template and the truncation settings), the precision and a format version.
Any change recomputes; an identical rerun, a later epoch or a resumed run reuses the file. Files are
written to a temporary name and renamed, so a killed run never leaves a half-written cache.

The digest and the cache (``fingerprint``, ``cached_tensors``) take any record type; KTO's task
(``posttrain.training.kto``) caches its own and its mismatched pairs' log-probs through them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from posttrain.data.collate import PairBatch, collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.model.load import evaluation_mode
from posttrain.model.logps import PairLogps

CACHE_FORMAT = "posttrain-reference-logps-v1"


class Reference(Protocol):
    def pair_logps(self, batch: PairBatch) -> PairLogps | None:
        """Reference summed log-probs and lengths of the batch's pairs, or None without a reference."""
        ...


class NoReference:
    def pair_logps(self, batch: PairBatch) -> PairLogps | None:
        return None


class FrozenReference:
    """A frozen model scored under ``torch.no_grad`` every step.

    ``context`` (optional) wraps each scoring: with LoRA the reference is the policy itself under
    ``disable_adapter()``, so the frozen "copy" costs no memory.
    """

    def __init__(
        self,
        model: nn.Module,
        score: Callable[[nn.Module, PairBatch], PairLogps],
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.model = model
        self.score = score
        self.context = context

    def pair_logps(self, batch: PairBatch) -> PairLogps:
        with torch.no_grad(), evaluation_mode(self.model), self.context():
            return self.score(self.model, batch).detach()


class CachedReference:
    """Precomputed per-pair reference log-probs, looked up by the batch's data set indices."""

    def __init__(self, chosen: Tensor, rejected: Tensor) -> None:
        self.chosen = chosen  # (N,) float32
        self.rejected = rejected

    def to(self, device: torch.device) -> CachedReference:
        return CachedReference(self.chosen.to(device), self.rejected.to(device))

    def pair_logps(self, batch: PairBatch) -> PairLogps:
        device = self.chosen.device
        counts = batch.completion_counts().to(device)
        n = batch.num_pairs
        i = batch.index.to(device)
        return PairLogps(self.chosen[i], self.rejected[i], counts[:n], counts[n:])


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


def compute_pair_logps(
    score: Callable[[nn.Module, PairBatch], PairLogps],
    model: nn.Module,
    records: Sequence[PreferenceRecord],
    pad_id: int,
    batch_size: int,
    layout: str = "padded",
) -> tuple[Tensor, Tensor]:
    """One no-grad pass over ``records``: (chosen, rejected) summed log-probs, each (N,) in ``records`` order,
    in batches of ``batch_size`` pairs laid out in ``layout``."""
    chosen = torch.empty(len(records))
    rejected = torch.empty(len(records))
    starts = range(0, len(records), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="reference log-probs", unit="batch", leave=False, dynamic_ncols=True):
            batch = collate_pairs(records[start : start + batch_size], pad_id, layout)
            out = score(model, batch)
            # By position in ``records`` (a process's share of a split starts anywhere in it).
            chosen[start : start + batch.num_pairs] = out.chosen_logps.float().cpu()
            rejected[start : start + batch.num_pairs] = out.rejected_logps.float().cpu()
    return chosen, rejected


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
    computes even when the file exists (processes that must compute together, see OfflineTask)."""
    path = cache_path(cache_dir, key)
    if reuse and path.exists():
        tensors = load_file(str(path))
        log(f"reference log-probs: reused cache {path}")
        return tensors
    tensors = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: processes on several nodes may write to one shared disk with equal pids.
    tmp = path.with_suffix(f".tmp-{socket.gethostname()}-{os.getpid()}")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata={"format": CACHE_FORMAT})
    os.replace(tmp, path)
    log(f"reference log-probs: computed and cached at {path}")
    return tensors


def cached_reference(
    cache_dir: Path,
    key: str,
    compute: Callable[[], tuple[Tensor, Tensor]],
    log: Callable[[str], None] = print,
) -> CachedReference:
    """Load the cache file for ``key`` or compute and store it (pairs: chosen and rejected log-probs)."""

    def named() -> dict[str, Tensor]:
        chosen, rejected = compute()
        return {"chosen": chosen, "rejected": rejected}

    tensors = cached_tensors(cache_dir, key, named, log)
    return CachedReference(tensors["chosen"], tensors["rejected"])
