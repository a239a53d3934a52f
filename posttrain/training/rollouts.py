"""One step's rollout: samples of the current policy, their rewards, and their log-probs under a model.

Under several processes each samples (and scores with the rewards) its share of the prompts, whole groups
each, and the shares are gathered (:func:`sample_all`): every process then holds the whole rollout, so
group statistics, tied-group filtering and PPO's whitening see the global batch, computed by the same code
as with one process. The processes then train on shares of its rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from posttrain import distributed
from posttrain.algorithms.online import OnlineAlgorithm
from posttrain.config import TrainConfig
from posttrain.data.collate import pack_units, pad_completions
from posttrain.data.prompts import PromptRecord, repeat_columns
from posttrain.errors import ConfigError
from posttrain.host import host_values, to_device
from posttrain.model.load import autocast
from posttrain.model.logps import TokenLogps, completion_logps
from posttrain.rewards.combine import CombinedReward, load_rewards
from posttrain.rollout.advantages import tied_groups
from posttrain.rollout.generate import Generator, SamplingParams, build_generator, shard_seed


@dataclass(frozen=True)
class Samples:
    """One step's rollout laid out for scoring: (N, T) tensors, N = prompts x num_generations."""

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    rewards: Tensor  # (N,) the weighted total
    per_reward: dict[str, Tensor]
    lengths: Tensor  # (N,) completion tokens
    truncated: Tensor  # (N,) bool
    texts: tuple[str, ...] = ()  # (N,) the decoded completions (iterative DPO saves them as pairs)

    def rows(self, rows: slice | Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, loss_mask)`` of some rows, on ``device``."""
        return tuple(to_device(t[rows], device) for t in (self.input_ids, self.attention_mask, self.loss_mask))  # type: ignore[return-value]


class Scorer:
    """Log-probs of samples under a model, at the sampling temperature and the run's precision.

    ``layout`` (see :func:`posttrain.model.spans.resolve_layout`): ``padded`` scores the rollout's padded
    rows as they are; ``packed`` and ``shared_prefix`` lay a micro-batch's rows out in one row without
    padding (``shared_prefix``: consecutive rows of the same prompt, a GRPO group, share one copy of it)
    and put the log-probs back in the rollout's (N, T) positions, so every loss reads them alike. Rows whose
    hidden states are asked for (a value head on the policy's trunk) are scored padded.
    """

    def __init__(
        self, config: TrainConfig, device: torch.device, temperature: float | None = None, layout: str = "padded"
    ) -> None:
        self.config = config
        self.device = device
        self.temperature = config.generation.temperature if temperature is None else temperature
        self.layout = layout

    def __call__(
        self, model: nn.Module, s: Samples, rows: slice | Tensor, entropy: bool = False, hidden: bool = False
    ) -> TokenLogps:
        with autocast(self.config.precision, self.device):
            if self.layout != "padded" and not hidden:
                return self._packed(model, s, rows, entropy)
            return completion_logps(
                model, *s.rows(rows, self.device), temperature=self.temperature,
                chunk_size=self.config.logps_chunk_size, with_entropy=entropy, with_hidden=hidden,
                scored=host_values(s.loss_mask[rows][:, 1:].sum()),  # (the rollout is on the host)
            )  # fmt: skip

    def _packed(self, model: nn.Module, s: Samples, rows: slice | Tensor, entropy: bool) -> TokenLogps:
        input_ids, attention_mask, loss_mask = s.rows(rows, torch.device("cpu"))
        completion = s.lengths[rows].long()
        units: list[tuple[list[int], list[list[int]]]] = []
        owners: list[list[int]] = []  # the rows of each unit's completions
        columns: list[range] = []  # each row's completion columns (right-padded rows)
        ends, sizes, rows_ids = (host_values(attention_mask.sum(-1)), host_values(completion),
                                 host_values(input_ids))  # the rollout lives on the host  # fmt: skip
        for i in range(input_ids.shape[0]):
            end = ends[i]
            columns.append(range(end - sizes[i], end))
            prompt, tokens = rows_ids[i][: columns[i].start], rows_ids[i][columns[i].start : end]
            if self.layout == "shared_prefix" and units and units[-1][0] == prompt:
                units[-1][1].append(tokens)
                owners[-1].append(i)
            else:
                units.append((prompt, [tokens]))
                owners.append([i])
        # The packed row's completion tokens in its order (unit after unit): their rollout row and column.
        at_row = [i for rows_of in owners for i in rows_of for _ in columns[i]]
        at_col = [c for rows_of in owners for i in rows_of for c in columns[i]]
        packed = pack_units(units, share_prefix=self.layout == "shared_prefix", sequence_ids=owners)
        device = self.device
        out = completion_logps(
            model, *(to_device(t, device) for t in (packed.input_ids, packed.attention_mask, packed.loss_mask)),
            temperature=self.temperature, chunk_size=self.config.logps_chunk_size, with_entropy=entropy,
            position_ids=to_device(packed.position_ids, device), spans=packed.spans,
            span_kernel=self.config.span_attention,
            scored=host_values(packed.loss_mask[:, 1:].sum()),
        )  # fmt: skip
        where = (to_device(torch.tensor(at_row, dtype=torch.long), device),
                 to_device(torch.tensor(at_col, dtype=torch.long), device))  # fmt: skip
        mask = to_device(loss_mask, device).bool()

        # The packed row's completion positions, found on the host (boolean indexing on the device would read it).
        scored_at = to_device(packed.loss_mask.reshape(-1).nonzero().squeeze(-1), device)

        def unpack(values: Tensor) -> Tensor:  # packed completion tokens -> the rollout's (N, T) positions
            flat = values.reshape(-1).index_select(0, scored_at)
            return torch.zeros(mask.shape, dtype=flat.dtype, device=device).index_put(where, flat) * mask

        ent = unpack(out.entropy) if out.entropy is not None else None
        return TokenLogps(logps=unpack(out.logps), mask=mask, entropy=ent)


def sample(
    generator: Generator,
    reward_fn: CombinedReward,
    prompts: list[PromptRecord],
    n: int,
    params: SamplingParams,
    seed: int,
    pad_id: int,
    mask_truncated: bool,
) -> Samples:
    """Steps 1-2: n completions per prompt from the current policy, scored by the rewards."""
    rollout = generator.generate([p.prompt_ids for p in prompts], n, params, seed)
    texts = [p.text for p in prompts for _ in range(n)]
    columns = repeat_columns(prompts, n)
    lengths = [len(c) for c in rollout.completion_ids]
    scores = reward_fn.score(texts, rollout.texts, completion_lengths=lengths, truncated=rollout.truncated, **columns)
    rows = [
        (p.prompt_ids, c) for p, c in zip([p for p in prompts for _ in range(n)], rollout.completion_ids, strict=True)
    ]
    input_ids, attention_mask, loss_mask = pad_completions(rows, pad_id)
    truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
    if mask_truncated:  # DAPO's overlong filtering: an unfinished answer teaches nothing either way
        loss_mask = loss_mask & ~truncated[:, None]
    return Samples(
        input_ids, attention_mask, loss_mask, torch.tensor(scores.total, dtype=torch.float64),
        {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.per_reward.items()},
        torch.tensor(lengths, dtype=torch.float64), truncated, tuple(rollout.texts),
    )  # fmt: skip


def policy_and_reference_logps(
    score: Scorer, policy: nn.Module, reference: nn.Module, s: Samples, rows: int = 16
) -> tuple[Tensor, Tensor]:
    """``(N, T)`` log-probs of every sample of ``s`` under ``policy`` and under ``reference`` (float64, on the
    host), scored ``rows`` at a time without gradients: what a KL measured on samples reads."""
    chunks = [slice(i, i + rows) for i in range(0, len(s.rewards), rows)]
    with torch.no_grad():
        pol, ref = ([score(m, s, r).logps.double().cpu() for r in chunks] for m in (policy, reference))
    return torch.cat(pol), torch.cat(ref)


def select_groups(s: Samples, groups: Tensor, n: int) -> Samples:
    """The samples of the groups (prompts) where ``groups`` (P,) is True."""
    rows = groups.repeat_interleave(n)
    texts = tuple(t for t, keep in zip(s.texts, host_values(rows), strict=True) if keep) if s.texts else ()
    return Samples(
        s.input_ids[rows], s.attention_mask[rows], s.loss_mask[rows], s.rewards[rows],
        {k: v[rows] for k, v in s.per_reward.items()}, s.lengths[rows], s.truncated[rows], texts,
    )  # fmt: skip


def concat_samples(a: Samples, b: Samples, pad_id: int) -> Samples:
    """Two sample sets as one, right-padded to the wider of the two."""
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x: Tensor, value: int | bool) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return Samples(
        torch.cat([pad(a.input_ids, pad_id), pad(b.input_ids, pad_id)]),
        torch.cat([pad(a.attention_mask, 0), pad(b.attention_mask, 0)]),
        torch.cat([pad(a.loss_mask, False), pad(b.loss_mask, False)]),
        torch.cat([a.rewards, b.rewards]),
        {k: torch.cat([a.per_reward[k], b.per_reward[k]]) for k in a.per_reward},
        torch.cat([a.lengths, b.lengths]), torch.cat([a.truncated, b.truncated]), a.texts + b.texts,
    )  # fmt: skip


def refill_informative(
    s: Samples,
    draw: Callable[[list[PromptRecord], int], Samples],
    prompts: list[PromptRecord],
    batch_size: int,
    n: int,
    max_resample: int,
    seed: int,
    pad_id: int,
) -> tuple[Samples, int]:
    """DAPO's dynamic sampling (Yu et al. 2025, section 3.2): groups whose rewards all tie have zero advantage and
    teach nothing; keep the others and ``draw(prompts, seed)`` groups of ``batch_size`` more prompts (drawn
    from ``prompts`` by a generator seeded from ``seed``) until ``batch_size`` informative groups are kept or
    ``max_resample`` draws were made. With none informative at all, the tied batch stays (zero advantages).
    Returns the samples and the number of extra draws."""
    kept = select_groups(s, ~tied_groups(s.rewards, n), n)
    resampled = 0
    while len(kept.rewards) < batch_size * n and resampled < max_resample:
        resampled += 1
        g = torch.Generator().manual_seed(seed * 31 + resampled)
        extra = [prompts[i] for i in torch.randperm(len(prompts), generator=g)[:batch_size].tolist()]
        more = draw(extra, seed + 7919 * resampled)
        kept = concat_samples(kept, select_groups(more, ~tied_groups(more.rewards, n), n), pad_id)
    if not len(kept.rewards):
        return s, resampled
    return select_groups(kept, torch.arange(len(kept.rewards) // n) < batch_size, n), resampled


def heldout_figures(
    generator: Generator, reward_fn: CombinedReward, prompts: list[PromptRecord], config: TrainConfig, pad_id: int
) -> dict[str, float]:
    """Greedy answers to held-out prompts: mean reward (the accuracy, under a 0/1 verifier), per reward, and
    the mean completion length."""
    gen = config.generation
    greedy = SamplingParams(gen.max_new_tokens, 0.0, 1.0, 0, gen.stop)
    s = sample_all(generator, reward_fn, prompts, 1, greedy, config.seed, pad_id, False)
    return {"reward": float(s.rewards.mean()), "completion_length": float(s.lengths.mean()),
            **{f"reward/{k}": float(v.mean()) for k, v in s.per_reward.items()}}  # fmt: skip


def sample_all(
    generator: Generator,
    reward_fn: CombinedReward,
    prompts: list[PromptRecord],
    n: int,
    params: SamplingParams,
    seed: int,
    pad_id: int,
    mask_truncated: bool,
) -> Samples:
    """:func:`sample` on this process's share of ``prompts``, the shares gathered in prompt order: every
    process gets the samples of all the prompts. Each share is seeded with :func:`shard_seed`, so a
    generator that seeds per prompt draws what one process would draw for the whole list."""
    mine = distributed.shard(len(prompts))
    local = None
    if mine.stop > mine.start:
        local = sample(generator, reward_fn, prompts[mine], n, params, shard_seed(seed, mine.start), pad_id,
                       mask_truncated)  # fmt: skip
    parts = [p for p in distributed.all_gather_objects(local) if p is not None]
    return functools.reduce(lambda a, b: concat_samples(a, b, pad_id), parts)


def gathered(parts: list[Tensor], s: Samples) -> Tensor:
    """(N, T) per-row tensors of the whole rollout ``s`` from this process's share of its rows (``parts``, the
    micro-batches of :func:`posttrain.distributed.shard` of the rows, in order): the shares gathered."""
    # (an empty share: no rows, on the device the other processes' shares are scored on)
    local = torch.cat(parts) if parts else torch.zeros((0, s.input_ids.shape[1]), device=distributed.device())
    return distributed.gather_rows(local)


def method_rewards(config: TrainConfig) -> CombinedReward:
    """The configured rewards plus the terms the method adds itself (DAPO's soft overlong punishment)."""
    alg = config.algorithm
    assert isinstance(alg, OnlineAlgorithm)
    if not config.rewards:
        raise ConfigError(f"rewards: method {alg.name} needs at least one reward (e.g. [{{name: numeric_answer}}])")
    extra = alg.extra_rewards(config.generation)
    named = {spec if isinstance(spec, str) else spec.get("name") for spec in config.rewards}
    for spec in extra:
        if spec["name"] in named:
            raise ConfigError(
                f"rewards: method {alg.name} adds the {spec['name']!r} reward itself (overlong_buffer, "
                "overlong_penalty); remove it from rewards or set overlong_buffer: 0"
            )
    try:
        return load_rewards([*config.rewards, *extra])
    except ValueError as err:  # checked when the config was read; what is left: a constructor's refusal
        raise ConfigError(f"rewards: {err}") from err


def default_generator(config: TrainConfig) -> Callable[[nn.Module, Any], Generator]:
    """``(model, tokenizer) -> Generator`` for the run's ``generation.backend``; called before anything is
    written, it refuses a vLLM backend that cannot start here with one line."""
    gen = config.generation
    if gen.backend == "vllm":
        from posttrain.rollout.vllm import require_vllm

        try:
            require_vllm()
        except (ImportError, RuntimeError) as err:
            raise ConfigError(str(err)) from None
    options: dict[str, Any] = {"batch_size": gen.batch_size, "loop": gen.loop}
    if gen.backend == "vllm":
        options = {"gpu_memory_utilization": gen.vllm_gpu_memory_utilization}
    return lambda model, tokenizer: build_generator(gen.backend, model, tokenizer, config.model, **options)
