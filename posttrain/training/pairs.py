"""The preference-pair task: the DPO family (dpo, ipo, cdpo, robust_dpo, hinge, simpo, orpo, distill)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from posttrain.algorithms import PreferenceAlgorithm
from posttrain.data.collate import PairBatch, collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.data.formats import load_preference
from posttrain.data.tokenize import TruncationStats, tokenize_preferences
from posttrain.losses import aggregate
from posttrain.model.logps import PairLogps
from posttrain.training.metrics import MetricSums
from posttrain.training.reference import (
    CachedReference,
    FrozenReference,
    NoReference,
    Reference,
    compute_pair_logps,
    read_pairs,
)
from posttrain.training.task import Counts, OfflineTask


def load_pair_records(
    task: OfflineTask[Any, Any], source: str, split: str
) -> tuple[list[PreferenceRecord], TruncationStats]:
    """Read, validate and tokenize preference pairs with a task's renderer and length limits (pairs and
    reward models train on the same records)."""
    data = task.config.data
    examples = load_preference(source, split)
    task.algorithm.check_examples(examples, source)
    return tokenize_preferences(examples, task.renderer, data.max_length, data.prompt_limit, source)


def pair_counts(records: Sequence[PreferenceRecord]) -> Counts:
    """Pairs and their completion tokens (the loss is per pair)."""
    return Counts(examples=len(records), tokens=sum(len(r.chosen_ids) + len(r.rejected_ids) for r in records))


class PairTask(OfflineTask[PreferenceRecord, PairBatch]):
    """(prompt, chosen, rejected) pairs, scored in one concatenated forward per micro-batch."""

    unit = "examples"
    layouts = ("padded", "packed", "shared_prefix")
    algorithm_type = PreferenceAlgorithm
    algorithm: PreferenceAlgorithm

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.references: dict[str, Reference[PairBatch, PairLogps | None]] = {}

    def load_records(self, source: str, split: str) -> tuple[list[PreferenceRecord], TruncationStats]:
        return load_pair_records(self, source, split)

    def collate(self, records: Sequence[PreferenceRecord]) -> PairBatch:
        return collate_pairs(records, self.tokenizer.pad_token_id, self.layout)

    def counts(self, records: Sequence[PreferenceRecord]) -> Counts:
        return pair_counts(records)

    def score(self, model: nn.Module, batch: PairBatch) -> PairLogps:
        """One concatenated chosen+rejected forward (the collator puts chosen rows first)."""
        return PairLogps.from_tokens(self.token_logps(model, batch))

    def prepare_references(self, policy: nn.Module, splits: dict[str, list[PreferenceRecord]], resumed: bool) -> None:
        """One reference per split, following ``config.reference.kind`` (see ReferenceConfig)."""
        config = self.config
        if not config.uses_reference:
            self.references = {name: NoReference() for name in splits}
            return
        if config.reference.kind == "copy":
            model, context = self.reference_model(policy, resumed, for_copy=True)
            self.references = {name: FrozenReference(model, self.score, context) for name in splits}
            return
        micro = config.micro_batch_size or config.batch_size
        pad_id = self.tokenizer.pad_token_id

        def compute(model: nn.Module, records: list[PreferenceRecord]) -> dict[str, Tensor]:
            return compute_pair_logps(self.score, model, records, pad_id, micro, self.layout)

        tables = self.cached_reference_tables(policy, splits, resumed, compute)
        self.references = {name: CachedReference(t, read_pairs) for name, t in tables.items()}

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
        ref = self.references[split].logps(batch)
        # Before the first step the policy has the reference's weights: its log-probs are the reference's.
        policy_is_ref = at_start and ref is not None and self.config.reference.model is None
        policy = ref if policy_is_ref and ref is not None else self.score(model, batch)
        out = self.algorithm.loss(policy, ref, batch.margin)
        sums.add("loss", out.loss)
        for name, value in out.metrics.items():
            sums.add(name, value)
        sums.add("policy_chosen_logps", policy.chosen_logps)  # per pair, whatever the layout
        sums.add("policy_rejected_logps", policy.rejected_logps)
        sums.add("policy_prefers_chosen", (policy.chosen_logps > policy.rejected_logps).float())
        sums.add("chosen_length", policy.chosen_lengths)
        sums.add("rejected_length", policy.rejected_lengths)
        if ref is not None:
            sums.add("ref_chosen_logps", ref.chosen_logps)
            sums.add("ref_rejected_logps", ref.rejected_logps)
        return aggregate(out.loss, global_count=counts.of(self.unit))

    def finish_figures(self, figures: dict[str, float]) -> dict[str, float]:
        figures["policy_margin"] = figures["policy_chosen_logps"] - figures["policy_rejected_logps"]
        return figures
