"""The unpaired-feedback task: KTO (Ethayarajh et al. 2024) on the one offline loop.

Each record is a prompt, a completion and a label (desirable or not), plus the completion of a fixed
partner record (see :func:`posttrain.data.unpaired.kl_partners`). Per optimizer step:

1. ``step_context``: the KL baseline ``z0`` of the paper, estimated once for the GLOBAL batch from the
   mismatched pairs ``(prompt_i, completion_partner(i))``: a no-grad pass in micro-batches summing the
   policy-minus-reference log-ratios and their count, both summed over processes, then
   ``z0 = max(0, sum / count)``. Micro-batching and sharding therefore leave it unchanged.
2. ``loss``: per micro-batch, policy and reference log-probs of the records' own completions, the KTO
   loss with that ``z0``, divided by the number of examples in the global batch.

The reference is a frozen copy scored every step (``reference.kind: copy``) or per-record log-probs of
both the matched and the mismatched pairs, computed once and cached on disk (``cached``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from posttrain import distributed
from posttrain.algorithms.kto import KTO, KTO_RANGE, kto_weights
from posttrain.data.examples import UnpairedRecord
from posttrain.data.tokenize import TruncationStats
from posttrain.data.unpaired import UnpairedBatch, collate_unpaired, load_unpaired, tokenize_unpaired
from posttrain.host import to_device
from posttrain.losses import aggregate
from posttrain.model.load import evaluation_mode
from posttrain.training.metrics import MetricSums
from posttrain.training.reference import (
    CachedReference,
    FrozenReference,
    Reference,
    compute_unpaired_logps,
    read_unpaired,
)
from posttrain.training.task import Counts, OfflineTask


def class_means(figures: dict[str, float]) -> dict[str, float]:
    """Turn the batch means of class-masked metrics into means over each class.

    A metric ``desirable_X`` (or ``undesirable_X``) is X on examples of that class and 0 on the others, so
    its batch mean divided by the batch mean of the ``desirable`` indicator is the class mean: the sum over
    the class divided by the class count. A class absent from the batch has no mean: its keys are dropped
    (no NaN in the figures).

    >>> class_means({"desirable": 0.5, "desirable_rewards": 0.25, "undesirable": 0.5, "undesirable_rewards": -0.25})
    {'desirable': 0.5, 'desirable_rewards': 0.5, 'undesirable': 0.5, 'undesirable_rewards': -0.5}
    >>> class_means({"desirable": 1.0, "desirable_rewards": 0.5, "undesirable": 0.0, "undesirable_rewards": 0.0})
    {'desirable': 1.0, 'desirable_rewards': 0.5, 'undesirable': 0.0}
    """
    out = dict(figures)
    for cls in ("desirable", "undesirable"):
        share = out.get(cls, 0.0)
        for key in [k for k in out if k.startswith(f"{cls}_")]:
            if share > 0:
                out[key] = out[key] / share
            else:
                del out[key]
    return out


def imbalance_guidance(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """The KTO paper's advice on class balance (Eq. 8), or None when the data and weights follow it.

    The paper sets the weights so that ``λ_D n_D / (λ_U n_U)`` lies in ``[1, 4/3]``; the suggested weights
    come from :func:`posttrain.algorithms.kto.kto_weights` (the larger class keeps weight 1).

    >>> imbalance_guidance(100, 100, 1.0, 1.0) is None
    True
    >>> print(imbalance_guidance(100, 300, 1.0, 1.0))  # doctest: +NORMALIZE_WHITESPACE
    kto: desirable_weight * n_D / (undesirable_weight * n_U) = 1 * 100 / (1 * 300) = 0.33 is outside [1, 4/3],
    the range the KTO paper recommends (Eq. 8); for this data set desirable_weight: 3 and undesirable_weight: 1
    """
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        return (
            f"kto: the training data has no {missing} examples; KTO is meant to learn from both classes "
            f"(the loss still trains, every example is pushed relative to the KL baseline alone)"
        )
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if KTO_RANGE[0] <= ratio <= KTO_RANGE[1]:
        return None
    lam_d, lam_u = kto_weights(n_desirable, n_undesirable)
    return (
        f"kto: desirable_weight * n_D / (undesirable_weight * n_U) = {desirable_weight:g} * {n_desirable} / "
        f"({undesirable_weight:g} * {n_undesirable}) = {ratio:.2f} is outside [1, 4/3], the range the KTO paper "
        f"recommends (Eq. 8); for this data set desirable_weight: {lam_d:g} and undesirable_weight: {lam_u:g}"
    )


class UnpairedTask(OfflineTask[UnpairedRecord, UnpairedBatch]):
    """(prompt, completion, label) examples; the loss is averaged over the examples of the global batch."""

    unit = "examples"
    layouts = ("padded", "packed")
    algorithm_type = KTO
    algorithm: KTO

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.references: dict[str, Reference[UnpairedBatch, Tensor]] = {}
        self._guided = False

    # ---- data
    def load_records(self, source: str, split: str) -> tuple[list[UnpairedRecord], TruncationStats]:
        data = self.config.data
        examples = load_unpaired(source, split)
        records, stats = tokenize_unpaired(
            examples, self.renderer, data.max_length, data.prompt_limit, source, seed=self.config.seed
        )
        if source == data.train and not self._guided:  # the weights balance the TRAINING classes
            self._guided = True
            n_d = sum(r.label for r in records)
            a = self.algorithm
            advice = imbalance_guidance(n_d, len(records) - n_d, a.desirable_weight, a.undesirable_weight)
            if advice is not None and distributed.is_main():
                tqdm.write(advice)
        return records, stats

    def collate(self, records: Sequence[UnpairedRecord]) -> UnpairedBatch:
        return collate_unpaired(records, self.tokenizer.pad_token_id, layout=self.layout)

    def counts(self, records: Sequence[UnpairedRecord]) -> Counts:
        tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in records)
        return Counts(examples=len(records), tokens=tokens)

    # ---- models
    def score(self, model: nn.Module, batch: UnpairedBatch) -> Tensor:
        """(B,) summed completion log-probs of the batch's rows under ``model``."""
        return self.token_logps(model, batch).sums

    def prepare_references(self, policy: nn.Module, splits: dict[str, list[UnpairedRecord]], resumed: bool) -> None:
        """One reference per split: a frozen copy, or cached log-probs of own and mismatched completions."""
        config = self.config
        if config.reference.kind == "copy":
            model, context = self.reference_model(policy, resumed, for_copy=True)
            self.references = {name: FrozenReference(model, self.score, context) for name in splits}
            return
        micro = config.micro_batch_size or config.batch_size
        pad_id = self.tokenizer.pad_token_id

        def compute(model: nn.Module, records: list[UnpairedRecord]) -> dict[str, Tensor]:
            return compute_unpaired_logps(self.score, model, records, pad_id, micro, self.layout)

        # The fingerprint covers the partners' completions too (they are token fields of the records).
        tables = self.cached_reference_tables(policy, splits, resumed, compute)
        self.references = {name: CachedReference(t, read_unpaired) for name, t in tables.items()}

    def step_context(self, model: nn.Module, records: Sequence[UnpairedRecord], split: str) -> Tensor:
        """The KL baseline ``z0`` of the global batch ``records``: a detached 0-dim float64 tensor, >= 0.

        The paper's ``max(0, (1/m) Σ log π_θ(y'|x') / π_ref(y'|x'))`` over the mismatched pairs of the
        batch (Section 4.1, "Implementation"), in micro-batches of ``micro_batch_size``; each process scores
        its share (in lockstep under fsdp2: a share a micro-batch short runs a filler) and the sums are added.
        """
        micro = self.config.micro_batch_size or self.config.batch_size
        pad_id = self.tokenizer.pad_token_id
        chunks = distributed.my_chunks(records, micro)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of log-ratios, count]
        with distributed.forward_only(model), evaluation_mode(model):  # a deterministic estimate: dropout off
            for chunk, real in distributed.lockstep(chunks, model, filler=records[:1]):
                batch = collate_unpaired(chunk, pad_id, kl=True, layout=self.layout)
                ratios = self.score(model, batch) - self.references[split].logps(batch).to(self.device)
                if real:
                    totals[0] += ratios.to(self.device, torch.float64).sum()
                    totals[1] += len(batch)
        distributed.all_reduce_sum(totals)
        return (totals[0] / totals[1]).clamp(min=0.0)

    # ---- the loss
    def loss(
        self,
        model: nn.Module,
        batch: UnpairedBatch,
        split: str,
        counts: Counts,
        sums: MetricSums,
        context: Any,
        at_start: bool = False,
    ) -> Tensor:
        if not isinstance(context, Tensor):
            raise TypeError("KTO's loss needs the KL baseline from step_context(...) as its context")
        ref = self.references[split].logps(batch)
        # Before the first step the policy has the reference's weights: its log-probs are the reference's.
        policy = ref if at_start and self.config.reference.model is None else self.score(model, batch)
        ref = ref.to(policy.device)
        labels = to_device(batch.labels, policy.device)
        out = self.algorithm.loss(policy, ref, labels, context)
        sums.add("loss", out.loss)
        for name, value in out.metrics.items():
            sums.add(name, value)
        desirable = labels.to(policy.dtype)
        sums.add("policy_logps", policy)
        sums.add("ref_logps", ref)
        sums.add("desirable_policy_logps", policy.detach() * desirable)
        sums.add("undesirable_policy_logps", policy.detach() * (1 - desirable))
        sums.add("completion_length", batch.completion_counts())
        return aggregate(out.loss, global_count=counts.of(self.unit))

    def finish_figures(self, figures: dict[str, float]) -> dict[str, float]:
        """Class means of the masked metrics (``desirable_rewards`` ...); keys of an absent class dropped."""
        return class_means(figures)
