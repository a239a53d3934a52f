"""What the offline loop needs from a kind of data: the seam between the one loop and the methods.

A task turns a data source into tokenized records, lays records out as batches, owns the reference (if
its methods use one), and computes the loss of one micro-batch divided by a GLOBAL count. The loop knows
nothing else about a method. Preference pairs (the DPO family) are one task; SFT, reward models and KTO
are others.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from posttrain import distributed
from posttrain.algorithms.base import Algorithm
from posttrain.config import ConfigError, TrainConfig
from posttrain.data.tokenize import Renderer, TruncationStats
from posttrain.host import host_values, to_device
from posttrain.model import embedded
from posttrain.model.load import autocast, evaluation_mode, freeze, load_causal_lm
from posttrain.model.logps import TokenLogps, completion_logps
from posttrain.model.lora import adapters_off, four_bit, is_lora
from posttrain.model.spans import resolve_layout
from posttrain.training.metrics import MetricSums
from posttrain.training.reference import cache_path, cached_tensors, fingerprint, weights_digest

R = TypeVar("R")
B = TypeVar("B")


def print_nothing(_: str) -> None:
    """The log of every process but the first (one line per run, not one per process)."""


@dataclass(frozen=True)
class Counts:
    """Units of one global batch, known before any forward: every rank sees the same global indices."""

    examples: int
    tokens: int

    def of(self, unit: str) -> int:
        return self.tokens if unit == "tokens" else self.examples


class OfflineTask(ABC, Generic[R, B]):
    """Base of every offline data kind. ``unit`` is what the loss is averaged over: examples or tokens."""

    unit: str = "examples"
    lora_task_type: str = "CAUSAL_LM"
    """The peft task type of this task's model (a reward model says SEQ_CLS)."""
    algorithm_type: ClassVar[type[Algorithm]] = Algorithm
    """The algorithm classes this task serves; subclasses narrow ``algorithm``'s annotation to match."""
    algorithm: Algorithm
    layouts: ClassVar[tuple[str, ...]] = ("padded",)
    """Batch layouts this task can lay its records out in (config ``layout``); ``auto`` picks the last."""
    layout: str = "padded"
    """The layout in force, set by :meth:`choose_layout` once the policy is loaded."""

    def __init__(self, config: TrainConfig, tokenizer: Any, device: torch.device) -> None:
        if not isinstance(config.algorithm, self.algorithm_type):
            raise TypeError(f"{type(self).__name__} serves {self.algorithm_type.__name__}, not {config.method}")
        self.algorithm = config.algorithm
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.renderer = Renderer(tokenizer, config.data.chat_template)

    # ---- data
    @abstractmethod
    def load_records(self, source: str, split: str) -> tuple[list[R], TruncationStats]:
        """Read, validate and tokenize a whole data source (each record's ``index`` is its position)."""

    @abstractmethod
    def collate(self, records: Sequence[R]) -> B: ...

    @abstractmethod
    def counts(self, records: Sequence[R]) -> Counts: ...

    # ---- models
    def load_model(self, name: str, trainable: bool = True, device: torch.device | None = None) -> nn.Module:
        """The model ``name``: the one to train (its base in 4-bit under QLoRA, loaded onto ``device``,
        default the task's) or a frozen one."""
        return load_causal_lm(
            name,
            trainable=trainable,
            gradient_checkpointing=self.config.gradient_checkpointing,
            quantized=self.quantized(trainable, device),
        )

    def quantized(self, trainable: bool, device: torch.device | None = None) -> dict[str, Any] | None:
        """QLoRA's loading arguments for the trained model (:func:`posttrain.model.lora.four_bit`), else None."""
        return four_bit(self.config.lora, self.config.precision, device or self.device) if trainable else None

    def choose_layout(self, policy: nn.Module) -> str:
        """Resolve ``config.layout`` for this task and model (see :func:`posttrain.model.spans.resolve_layout`)."""
        requested = self.config.layout
        if requested not in ("auto", *self.layouts):
            raise ConfigError(
                f"layout: {requested} is not available for method {self.config.method} "
                f"(it lays out {', '.join(self.layouts)}); use layout: auto"
            )
        try:
            self.layout = resolve_layout(requested, self.layouts[-1], policy, self.config.data.max_length)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return self.layout

    def prepare_references(self, policy: nn.Module, splits: dict[str, list[R]], resumed: bool) -> None:
        """Build the reference for each split (a frozen copy, a cache or nothing). Default: nothing."""

    def reference_model(
        self, policy: nn.Module, resumed: bool, for_copy: bool
    ) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager[Any]]]:
        """The reference weights and the context to score them in.

        LoRA: the policy with adapters off (its base never changes, resumed or not). Otherwise the
        policy's starting weights (frozen deep copy when ``for_copy``, i.e. scored while the policy
        trains), or a loaded model: ``reference.model``, or the starting model when resuming. A model scored
        while the policy trains is sharded like the policy under ``fsdp2`` (a replica per process otherwise).
        """
        ref_name = self.config.reference.model
        if ref_name is None and is_lora(policy):
            return policy, adapters_off(policy)
        if ref_name is None and not resumed and not for_copy:
            return policy, contextlib.nullcontext
        if ref_name is None and not resumed:
            model = freeze(copy.deepcopy(policy))
        else:
            model = self.load_model(ref_name or self.config.model, trainable=False).to(self.device)
        if for_copy and self.config.distributed.strategy == "fsdp2":
            distributed.prepare(model, "fsdp2")
        return model, contextlib.nullcontext

    def cached_reference_tables(
        self,
        policy: nn.Module,
        splits: dict[str, list[R]],
        resumed: bool,
        compute: Callable[[nn.Module, list[R]], dict[str, Tensor]],
    ) -> dict[str, dict[str, Tensor]]:
        """``reference.kind: cached``: per split, the named per-record tensors ``compute`` returns for the
        reference model, loaded from the disk cache or computed once (dropout off) and stored.

        The key fingerprints the reference weights and architecture, the split's token ids and the
        precision. A separately loaded reference model goes out of scope on return: nothing stays in memory.
        With several processes, each computes its share of a split and the shares are gathered; every
        process writes the file atomically where it does not see it (a disk per node, or one shared).
        """
        config = self.config
        model, context = self.reference_model(policy, resumed, for_copy=False)
        cache_dir = Path(config.reference.cache_dir or embedded.cache_root() / "reference")
        digest = weights_digest(model)
        tables: dict[str, dict[str, Tensor]] = {}
        log = tqdm.write if distributed.is_main() else print_nothing
        with evaluation_mode(model):
            for name, records in splits.items():

                def run(r: list[R] = records) -> dict[str, Tensor]:
                    # Several processes: each scores its contiguous share, the shares are gathered in rank
                    # order, so every process holds the whole table for a world_size-th of the work.
                    part = r[distributed.shard(len(r))]
                    with context():
                        local = compute(model, part)
                    return {k: distributed.gather_rows(v) for k, v in local.items()}

                key = fingerprint(digest, records, config.precision)
                # Reuse only when every process sees the file (nodes without a shared disk compute together).
                found = all(distributed.all_gather_objects(cache_path(cache_dir, key).exists()))
                stored = cached_tensors(cache_dir, key, run, log=log, reuse=found)
                tables[name] = {k: v.to(self.device) for k, v in stored.items()}
        return tables

    def step_context(self, model: nn.Module, records: Sequence[R], split: str) -> Any:
        """Statistics of the whole global batch ``records`` that every micro-batch needs (KTO's KL baseline);
        every process calls it with the same ``records`` and scores its own share."""
        return None

    # ---- the loss
    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        batch: B,
        split: str,
        counts: Counts,
        sums: MetricSums,
        context: Any,
        at_start: bool = False,
    ) -> Tensor:
        """Loss of one micro-batch divided by the global count of ``unit``; metrics summed into ``sums``.

        ``at_start``: evaluation before the first step (the policy still has its starting weights)."""

    def finish_figures(self, figures: dict[str, float]) -> dict[str, float]:
        """Figures derived from the reduced ones (e.g. the policy's chosen-over-rejected margin)."""
        return figures

    def autocast(self) -> Any:
        return autocast(self.config.precision, self.device)

    def token_logps(self, model: nn.Module, batch: Any) -> TokenLogps:
        """The log-prob primitive on a batch with ``input_ids``, ``attention_mask`` and ``loss_mask``,
        on the model's device, under the run's precision and LM-head chunk size."""
        device = next(model.parameters()).device
        with self.autocast():
            position_ids = getattr(batch, "position_ids", None)  # set by packing collators
            sequence = getattr(batch, "sequence", None)  # set by the span layouts (packed, shared_prefix)
            return completion_logps(
                model, *(to_device(t, device) for t in (batch.input_ids, batch.attention_mask, batch.loss_mask)),
                chunk_size=self.config.logps_chunk_size,
                position_ids=None if position_ids is None else to_device(position_ids, device),
                spans=getattr(batch, "spans", None),
                sequence=None if sequence is None else to_device(sequence, device),
                num_sequences=getattr(batch, "num_sequences", 0), span_kernel=self.config.span_attention,
                scored=host_values(batch.loss_mask[:, 1:].sum()),  # (a host tensor: counted for free)
            )  # fmt: skip
