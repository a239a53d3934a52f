"""The generator seam of the online loop: prompt ids -> ``n`` completions each, from the CURRENT policy.

:class:`HFGenerator` samples with ``model.generate`` on left-padded batches; :class:`ScriptedGenerator` is a
deterministic test double that draws from fixed candidate texts, weighted by a model's sequence log-probs
so that its samples still follow the policy being trained; :class:`posttrain.rollout.vllm.VLLMGenerator`
(GPU, imported only when asked for) is the third. :func:`build_generator` picks by ``generation.backend``.

A completion is what the loss trains on: the sampled ids up to and including the first EOS (ids after it are
padding), or up to the end of the first stop string, or all ``max_new_tokens`` ids (then ``truncated``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from posttrain.data.collate import pad_completions
from posttrain.model.logps import completion_logps
from posttrain.rollout.decode import decode, decode_obstacle, left_pad
from posttrain.rollout.sampling import Generator, Rollout, SamplingParams, cut_completion, eos_ids

__all__ = [
    "PROMPT_SEED_STRIDE", "Generator", "HFGenerator", "Rollout", "SamplingParams", "ScriptedGenerator",
    "build_generator", "cut_completion", "shard_seed",
]  # fmt: skip

PROMPT_SEED_STRIDE = 1 << 20
"""Seeds of consecutive prompts of one call are this far apart (see :func:`shard_seed`): more than any
step count, so no two prompts of two steps share a seed."""


def shard_seed(seed: int, first: int) -> int:
    """The seed of a call on ``prompts[first:]`` of a batch whose call would be seeded ``seed``.

    A generator that seeds each prompt on its own (prompt ``i`` of a call from ``seed + PROMPT_SEED_STRIDE *
    i``, as :class:`ScriptedGenerator` does) then draws for each prompt of a shard exactly what the whole
    batch's call draws for it: data-parallel processes that each sample their share of the prompts
    together sample what one process would. Batched samplers (HF ``generate``, vLLM) draw from one stream per
    call: each shard gets a different stream, not the whole batch's numbers. ``first == 0`` keeps ``seed``.

    >>> shard_seed(7, 0), shard_seed(7, 2) - shard_seed(7, 1) == PROMPT_SEED_STRIDE
    (7, True)
    """
    return seed + PROMPT_SEED_STRIDE * first


# Distribution-changing options that a Hub ``generation_config.json`` may set (Qwen2.5 ships
# ``repetition_penalty: 1.05``): pinned to neutral values so that samples come from the policy's own
# distribution, the one whose log-probs the loss uses.
_NEUTRAL: dict[str, Any] = dict(
    num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, min_p=0.0,
    epsilon_cutoff=0.0, eta_cutoff=0.0, min_new_tokens=0,
)  # fmt: skip


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) inside, each submodule's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class HFGenerator:
    """Samples with transformers, always from the model's current weights (it holds the module itself).

    Rows (each prompt repeated ``n`` times) are decoded ``batch_size`` at a time, left-padded with the
    tokenizer's pad id (its EOS when it has none), under ``torch.no_grad()`` in eval mode, seeded inside
    ``torch.random.fork_rng`` so the caller's RNG is untouched. A PEFT model generates with adapters on.
    ``loop``: ``auto`` decodes with :func:`posttrain.rollout.decode.decode` (a prompt's samples share one
    prefill) where :func:`~posttrain.rollout.decode.decode_obstacle` allows it, else with ``model.generate``
    (``generate``: always); both sample from the same distribution, not the same random numbers.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16, loop: str = "auto") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if loop not in ("auto", "generate"):
            raise ValueError(f"loop must be auto or generate, got {loop!r}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.own_loop = loop == "auto" and decode_obstacle(model) is None
        self.eos_ids = eos_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self.pad_id: int = self.eos_ids[0] if pad is None else int(pad)

    def _sampling_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            _NEUTRAL, max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, use_cache=True, do_sample=params.temperature > 0,
            synced_gpus=False,  # (each process decodes its share alone, see distributed.full_weights)
        )  # fmt: skip
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        return kwargs

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Rollout:
        """``n`` completions of every prompt, prompt-major (sample j of prompt i at ``i * n + j``)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        rows = [tuple(p) for p in prompt_ids for _ in range(n)]
        device = next(self.model.parameters()).device
        fork: dict[str, Any] = {"devices": []}
        if device.type == "cuda":
            fork = {"devices": [device.index if device.index is not None else torch.cuda.current_device()]}
        kwargs = self._sampling_kwargs(params)
        raw: list[list[int]] = []
        with torch.random.fork_rng(**fork), torch.no_grad(), _eval_mode(self.model):
            torch.manual_seed(seed)
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                if self.own_loop:
                    raw.extend(decode(self.model, batch, params.max_new_tokens, params.temperature, params.top_k,
                                      params.top_p, self.eos_ids, self.pad_id))  # fmt: skip
                    continue
                input_ids, attention_mask = left_pad(batch, self.pad_id)
                width = input_ids.shape[1]
                out = self.model.generate(  # type: ignore[operator]
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
                )
                raw.extend(out[:, width:].tolist())  # (B, new tokens)
        return self._finish(raw, params.stop)

    def _finish(self, raw: list[list[int]], stop: Sequence[str]) -> Rollout:
        eos, completions, truncated = set(self.eos_ids), [], []
        for ids in raw:
            cut, trunc = cut_completion(ids, eos, stop, self._decode)
            completions.append(cut)
            truncated.append(trunc)
        return Rollout(completions, [self._decode(c) for c in completions], truncated)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


class ScriptedGenerator:
    """A deterministic test double: samples each prompt's completions from a fixed list of candidate texts.

    ``candidates``: the same list for every prompt, or ``f(prompt_text, prompt_index) -> list`` with the
    prompt decoded with special tokens skipped. Each candidate's ids are its text tokenized with
    ``add_special_tokens=False`` plus EOS. Draws are uniform when ``score_model`` is None, else with
    probabilities ``softmax(log p(candidate | prompt) / temperature)`` under ``score_model``'s CURRENT
    weights, scored by :func:`~posttrain.model.logps.completion_logps`: a policy that learns to prefer a
    rewarded candidate then draws it more, as a real sampler would. ``params`` is ignored; never truncated.
    """

    def __init__(
        self,
        tokenizer: Any,
        candidates: Callable[[str, int], list[str]] | list[str],
        score_model: nn.Module | None = None,
        temperature: float = 1.0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.tokenizer, self.candidates = tokenizer, candidates
        self.score_model, self.temperature = score_model, temperature
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)

    def _texts(self, prompt: Sequence[int], index: int) -> list[str]:
        if callable(self.candidates):
            texts = self.candidates(self.tokenizer.decode(list(prompt), skip_special_tokens=True), index)
        else:
            texts = list(self.candidates)
        if not texts:
            raise ValueError(f"no candidate completions for prompt {index}")
        return texts

    def probabilities(self, prompt: Sequence[int], completions: Sequence[Sequence[int]]) -> list[float]:
        """The draw probability of each candidate (ids with EOS) of one prompt."""
        if self.score_model is None:
            return [1.0 / len(completions)] * len(completions)
        model = self.score_model
        input_ids, attention_mask, loss_mask = pad_completions([(prompt, c) for c in completions], self.pad_id)
        device = next(model.parameters()).device
        with torch.no_grad(), _eval_mode(model):
            logps = completion_logps(model, input_ids.to(device), attention_mask.to(device), loss_mask.to(device))
        return torch.softmax(logps.sums.double() / self.temperature, dim=0).tolist()

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Rollout:
        """``n`` draws (with replacement) per prompt, prompt-major; prompt ``i`` draws from ``random.Random(seed
        + PROMPT_SEED_STRIDE * i)``, so a shard of the prompts called with :func:`shard_seed` draws what the
        whole batch draws for them."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        completions: list[tuple[int, ...]] = []
        texts: list[str] = []
        for index, prompt in enumerate(prompt_ids):
            # Python's generator: the same draws on every torch version and device.
            rng = random.Random(seed + PROMPT_SEED_STRIDE * index)
            options = self._texts(prompt, index)
            ids = [(*self.tokenizer(t, add_special_tokens=False)["input_ids"], self.eos_id) for t in options]
            picks = rng.choices(range(len(options)), weights=self.probabilities(prompt, ids), k=n)
            completions += [ids[k] for k in picks]
            texts += [options[k] for k in picks]
        return Rollout(completions, texts, [False] * len(completions))


def build_generator(backend: str, model: nn.Module, tokenizer: Any, model_path: str, **options: Any) -> Generator:
    """The generator of ``generation.backend``: ``hf`` (:class:`HFGenerator`) or ``vllm`` (a colocated engine
    started from ``model_path``, the policy's starting weights, fed the current weights before each rollout)."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, **options)
    if backend == "vllm":
        from posttrain.model import embedded
        from posttrain.rollout.vllm import VLLMGenerator

        return VLLMGenerator(model, tokenizer, embedded.resolve(model_path), **options)
    raise ValueError(f"generation.backend must be hf or vllm, got {backend!r}")
