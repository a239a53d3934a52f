"""The SFT task: demonstrations, token-level NLL averaged over the global count of trained tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from posttrain.algorithms.sft import SFT
from posttrain.data.sft import (
    SequenceBatch,
    SequenceRecord,
    collate_packed,
    collate_sequences,
    load_sft,
    tokenize_sft,
)
from posttrain.data.tokenize import TruncationStats
from posttrain.losses import aggregate, sft
from posttrain.training.metrics import MetricSums
from posttrain.training.task import Counts, OfflineTask


class SFTTask(OfflineTask[SequenceRecord, SequenceBatch]):
    unit = "tokens"
    layouts = ("padded", "packed")
    algorithm_type = SFT
    algorithm: SFT

    def choose_layout(self, policy: nn.Module) -> str:
        """``packing: true`` (or ``layout: packed``) packs rows; ``auto`` scores them with span attention
        where it is exact, else with transformers' block-diagonal mask (layout ``padded``)."""
        if self.config.layout == "auto" and not self.algorithm.packing:
            self.layout = "padded"
            return self.layout
        return super().choose_layout(policy)

    def load_records(self, source: str, split: str) -> tuple[list[SequenceRecord], TruncationStats]:
        examples = load_sft(source, split)
        return tokenize_sft(
            examples, self.renderer, self.config.data.max_length, self.algorithm.completion_only, source
        )

    def collate(self, records: Sequence[SequenceRecord]) -> SequenceBatch:
        if self.algorithm.packing or self.layout == "packed":
            pad, width = self.tokenizer.pad_token_id, self.config.data.max_length
            return collate_packed(records, pad, width, spans=self.layout == "packed")
        return collate_sequences(records, self.tokenizer.pad_token_id)

    def counts(self, records: Sequence[SequenceRecord]) -> Counts:
        return Counts(examples=len(records), tokens=sum(sum(r.loss_mask) for r in records))

    def loss(
        self,
        model: nn.Module,
        batch: SequenceBatch,
        split: str,
        counts: Counts,
        sums: MetricSums,
        context: Any,
        at_start: bool = False,
    ) -> Tensor:
        tokens = self.token_logps(model, batch)
        out = sft(policy_logps=tokens.logps, loss_mask=tokens.mask)
        sums.add("loss", out.metrics["nll_sum"], per="tokens")
        sums.add("trained_tokens", out.metrics["tokens"])
        return aggregate(out.loss, global_count=counts.of(self.unit))
