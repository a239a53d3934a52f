"""What every sampler takes and gives, shared by the HF backend (generate.py) and vLLM (vllm.py): the
sampling settings, the rollout, the ``Generator`` protocol, where a completion ends (EOS or a stop string)
and which ids end one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` switch those off.

    ``stop``: stop strings; a completion is cut right after the first one (end of the token completing it).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a YAML list is accepted
        checks = {
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "temperature": (self.temperature >= 0, ">= 0"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k >= 0, ">= 0"),
            "stop": (all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Rollout:
    """n samples per prompt, prompt-major order: sample j of prompt i is at i * n + j."""

    completion_ids: list[tuple[int, ...]]  # what is trained on: ends with EOS when the model finished
    texts: list[str]  # decoded completions (special tokens skipped)
    truncated: list[bool]  # True when max_new_tokens was reached without EOS or a stop string


@runtime_checkable
class Generator(Protocol):
    """Prompts (token ids) -> ``n`` completions each, sampled with ``params``, reproducible from ``seed``."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Rollout: ...


def cut_completion(
    ids: Sequence[int], eos_ids: set[int], stop: Sequence[str], decode: Callable[[Sequence[int]], str]
) -> tuple[tuple[int, ...], bool]:
    """``(completion ids, truncated)`` from raw generated ids (which may end in padding).

    Keeps the ids up to and including the first EOS; then, if the decoded text contains a stop string, the
    shortest prefix whose decoding contains one. Truncated: neither an EOS nor a stop string was found.

    >>> cut_completion([7, 8, 2, 5, 5], {2}, (), lambda ids: "")
    ((7, 8, 2), False)
    """
    ids = tuple(ids)
    ended = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    if ended is not None:
        ids = ids[: ended + 1]
    if stop and any(s in decode(ids) for s in stop):
        lo, hi = 1, len(ids)  # the answer lies in [lo, hi]: containment grows with the prefix
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in decode(ids[:mid]) for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return ids[:lo], False
    return ids, ended is None


def eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """The tokenizer's EOS plus every EOS of the model's generation config (e.g. an end-of-turn token)."""
    found = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    found += extra if isinstance(extra, (list, tuple)) else [extra]
    ids = list(dict.fromkeys(int(t) for t in found if t is not None))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation config names none")
    return ids
