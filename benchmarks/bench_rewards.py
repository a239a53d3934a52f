"""The GRPO benchmark's rule reward, one function that both tools call.

posttrain calls ``reward(prompts, completions, **columns)`` with completion texts (it is named in the config
as ``bench_rewards:vowel_share``); TRL calls ``reward(prompts=..., completions=..., completion_ids=..., ...)``
and, for conversational prompts, hands each completion as ``[{"role": "assistant", "content": text}]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # TRL, conversational data: the assistant message(s)
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def vowel_share(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Share of a completion's letters that are vowels (in [0, 1]; 0 for a completion with no letter).

    >>> vowel_share(["p", "p"], ["banana", [{"role": "assistant", "content": "xyz!"}]])
    [0.5, 0.0]
    """
    out = []
    for completion in completions:
        letters = [ch for ch in _text(completion).lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0)
    return out
