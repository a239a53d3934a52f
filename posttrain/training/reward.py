"""The reward-model task: a sequence classifier scores prompt + chosen and prompt + rejected, Bradley-Terry loss.

The data are the DPO family's preference pairs (same readers, same tokenization, same concatenated
chosen+rejected batch); what differs is the model (a scalar head instead of the LM head), the score (one
number per row instead of summed log-probs) and the loss. There is no reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.algorithms.reward import RewardModel
from posttrain.data.collate import PairBatch, collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.data.tokenize import Renderer, TruncationStats
from posttrain.host import to_device
from posttrain.losses import aggregate
from posttrain.model.load import add_distinct_pad, load_reward_model
from posttrain.model.masks import causal_padding_mask
from posttrain.training.metrics import MetricSums
from posttrain.training.pairs import load_pair_records, pair_counts
from posttrain.training.task import Counts, OfflineTask


def pad_free_probe(renderer: Renderer) -> set[int]:
    """Every id of a rendered prompt + completion: a pad token among them could end a real row."""
    return set(renderer.prompt_ids("x") + renderer.completion_ids("x", "y"))


class RewardTask(OfflineTask[PreferenceRecord, PairBatch]):
    """(prompt, chosen, rejected) pairs scored by a reward model in one concatenated forward per micro-batch."""

    unit = "examples"
    algorithm_type = RewardModel
    algorithm: RewardModel
    lora_task_type = "SEQ_CLS"  # peft then trains (and saves) the new score head whole, next to the adapters

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Before any record or model exists: the records are padded with this id, the embeddings sized to
        # it, and the tokenizer saved next to the model carries it (the loop saves this very object).
        add_distinct_pad(self.tokenizer, avoid=pad_free_probe(self.renderer))

    # ---- data: the preference pairs of the DPO family
    def load_records(self, source: str, split: str) -> tuple[list[PreferenceRecord], TruncationStats]:
        return load_pair_records(self, source, split)

    def collate(self, records: Sequence[PreferenceRecord]) -> PairBatch:
        return collate_pairs(records, self.tokenizer.pad_token_id)  # with the rows' margins

    def counts(self, records: Sequence[PreferenceRecord]) -> Counts:
        return pair_counts(records)

    # ---- the model: a sequence classifier, from a causal LM (new head) or a saved reward model (resume)
    def load_model(self, name: str, trainable: bool = True, device: torch.device | None = None) -> nn.Module:
        gradient_checkpointing = self.config.gradient_checkpointing
        return load_reward_model(
            name,
            self.tokenizer,
            trainable=trainable,
            gradient_checkpointing=gradient_checkpointing,
            quantized=self.quantized(trainable, device),
        )

    def score(self, model: nn.Module, batch: PairBatch) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) rewards, each (B,), at least float32: the model's own forward, which reads the score at
        the last token that is not the pad token, exactly as plain transformers does after loading."""
        device = next(model.parameters()).device
        with self.autocast():
            mask = causal_padding_mask(model, to_device(batch.attention_mask, device))  # (prepared: no device read)
            out = model(input_ids=to_device(batch.input_ids, device), attention_mask=mask, use_cache=False)
        logits = out.logits.squeeze(-1)  # (2B,)
        rewards = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
        n = batch.num_pairs
        return rewards[:n], rewards[n:]

    # ---- the loss
    def loss(
        self,
        model: nn.Module,
        batch: PairBatch,
        split: str,
        counts: Counts,
        sums: MetricSums,
        context: Any,
        at_start: bool = False,
    ) -> Tensor:
        chosen, rejected = self.score(model, batch)
        margin = batch.margin.to(chosen.device) if batch.margin is not None else None
        out = self.algorithm.loss(chosen, rejected, margin)
        sums.add("loss", out.loss)
        for name, value in out.metrics.items():
            sums.add(name, value)
        return aggregate(out.loss, global_count=counts.of(self.unit))
