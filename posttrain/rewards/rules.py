"""Rule-based rewards: a numeric final answer, a format regex, a length penalty, DAPO's overlong punishment.

Every reward is a plain callable ``(prompts, completions, **columns) -> list[float]``, one float per
completion. ``columns`` are the prompt data set's other columns, one value per sample (``answer``, ...),
plus what the online loop adds: ``completion_lengths``, the completion's token count. A reward ignores the
columns it does not use. :mod:`posttrain.rewards.combine` names, loads and adds them up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RewardFn = Callable[..., list[float]]
"""``(prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]``."""

# A number: optional minus (ASCII or U+2212), digits with optional comma thousands groups, optional
# decimals. Not inside a word or after a dot ("x2", "v1.2.3" -> 1.2), so "10-3" reads as 10 and 3.
_NUMBER = re.compile(r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
_MARKER = re.compile(r"answer\s*(?:is|:)|####|\\boxed\{", re.IGNORECASE)


def _to_float(number: str) -> float:
    return float(number.replace(",", "").replace("−", "-"))


def extract_number(text: str) -> float | None:
    """The final answer of ``text`` as a number, or None when it holds no number.

    Rule: the first number after the last answer marker ("answer is", "answer:", GSM8K's "####", or
    ``\\boxed{``, case-insensitive); without a marker, or with no number after it, the last number in the
    text. Numbers may be negative ("-3", "−3"), have comma thousands separators ("1,234") and decimals
    ("2.5"); a minus right after a digit or letter is an operator, not a sign. Not read: fractions ("3/4"
    gives 4), scientific notation, number words.

    >>> extract_number("3 + 4 = 7, so the answer is 7.")
    7.0
    >>> extract_number("The answer is -1,234.5 dollars, not 12.")
    -1234.5
    >>> extract_number("10-3 leaves 7 apples"), extract_number("no digits here")
    (7.0, None)
    """
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _NUMBER.search(text, markers[-1].end())
        if after:
            return _to_float(after.group())
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _column(columns: Mapping[str, Sequence[Any]], name: str, n: int, owner: str) -> Sequence[Any]:
    if name not in columns:
        raise ValueError(f"{owner} needs the column {name!r}; columns given: {sorted(columns)}")
    values = columns[name]
    if len(values) != n:
        raise ValueError(f"{owner}: column {name!r} has {len(values)} values for {n} completions")
    return values


class NumericAnswer:
    """``correct`` when the completion's final number (:func:`extract_number`) is within ``tolerance``
    (absolute) of the sample's ``column`` value, else ``wrong``; a completion without a number is wrong.

    The column value may be a number or a string; a string is read with the same rule, so "1,234" and a
    GSM8K solution ending in "#### 72" both work. A value with no number in it is an error, not a 0.

    >>> reward = NumericAnswer()
    >>> reward(["2+2?"] * 4, ["The answer is 4.", "4.0", "It is 5", "four"], answer=["4", 4, "4", "4"])
    [1.0, 1.0, 0.0, 0.0]
    """

    def __init__(self, column: str = "answer", correct: float = 1.0, wrong: float = 0.0, tolerance: float = 1e-6):
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.column, self.correct, self.wrong, self.tolerance = column, correct, wrong, tolerance
        self.required_columns = (column,)  # checked against the data before anything samples

    def check_column(self, name: str, value: Any) -> str | None:
        """What is wrong with a row's value of ``column`` (checked before anything samples), or None.

        >>> NumericAnswer().check_column("answer", "two")
        "holds no number: 'two'"
        """
        reference = float(value) if isinstance(value, (int, float)) else extract_number(str(value))
        if reference is None or not math.isfinite(reference):
            return f"holds no number: {str(value)[:80]!r}"
        return None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        references = _column(columns, self.column, len(completions), "NumericAnswer")
        scores = []
        for i, (completion, value) in enumerate(zip(completions, references, strict=True)):
            problem = self.check_column(self.column, value)
            if problem:
                raise ValueError(f"sample {i}: column {self.column!r} {problem}")
            reference = float(value) if isinstance(value, (int, float)) else extract_number(str(value))
            assert reference is not None
            guess = extract_number(completion)
            hit = guess is not None and abs(guess - reference) <= self.tolerance
            scores.append(self.correct if hit else self.wrong)
        return scores


class RegexFormat:
    """``reward`` when ``pattern`` matches the completion (``re.search``; ``re.fullmatch`` when
    ``fullmatch``), else ``penalty``. ``flags`` default to ``re.DOTALL`` so ``.`` spans lines. The pattern
    sees the completion exactly, surrounding whitespace included.

    >>> reward = RegexFormat(r"<think>.*</think>\\s*<answer>.*</answer>", fullmatch=True)
    >>> reward(["q", "q"], ["<think>2+2\\n=4</think> <answer>4</answer>", "<answer>4</answer>"])
    [1.0, 0.0]
    """

    def __init__(
        self, pattern: str, reward: float = 1.0, penalty: float = 0.0, fullmatch: bool = False, flags: int = re.DOTALL
    ):
        self.regex = re.compile(pattern, flags)
        self.reward, self.penalty, self.fullmatch = reward, penalty, fullmatch

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        match = self.regex.fullmatch if self.fullmatch else self.regex.search
        return [self.reward if match(c) else self.penalty for c in completions]


class LengthPenalty:
    """``-coef * max(0, L - target)``: 0 up to the target length, then minus ``coef`` per unit beyond.

    Give exactly one target: ``target_chars`` (L is ``len(completion)``) or ``target_tokens`` (L is the
    ``completion_lengths`` column, the token counts the online loop passes).

    >>> LengthPenalty(target_chars=5, coef=0.5)(["q"] * 3, ["abc", "abcde", "abcdefgh"])
    [0.0, 0.0, -1.5]
    >>> LengthPenalty(target_tokens=100, coef=0.01)(["q"], ["..."], completion_lengths=[150])
    [-0.5]
    """

    def __init__(self, target_chars: int | None = None, target_tokens: int | None = None, coef: float = 0.001):
        if (target_chars is None) == (target_tokens is None):
            raise ValueError("LengthPenalty takes exactly one of target_chars and target_tokens")
        target = target_chars if target_chars is not None else target_tokens
        if target is None or target < 0 or not coef >= 0:
            raise ValueError(f"LengthPenalty needs a target >= 0 and coef >= 0, got {target} and {coef}")
        self.target, self.in_tokens, self.coef = target, target_tokens is not None, coef

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        if self.in_tokens:
            lengths = _column(columns, "completion_lengths", len(completions), "LengthPenalty(target_tokens=...)")
        else:
            lengths = [len(c) for c in completions]
        return [0.0 - self.coef * max(0.0, float(n) - self.target) for n in lengths]  # 0.0 -: no -0.0


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", arXiv:2503.14476, Eq. 13), with
    ``L_max = max_length``, ``L_cache = cache`` and ``|y|`` the ``completion_lengths`` column (tokens)::

        R(y) = 0                                  if |y| <= L_max - L_cache
               ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
               -1                                 if |y| > L_max

    The paper uses ``L_max = 20480``, ``L_cache = 4096`` (the generation limit being ``L_max``) and adds this
    to the correctness reward.

    >>> SoftOverlongPunishment(max_length=20, cache=4)(["q"] * 5, [""] * 5, completion_lengths=[16, 17, 18, 20, 25])
    [0.0, -0.25, -0.5, -1.0, -1.0]
    """

    def __init__(self, max_length: int, cache: int):
        if not 0 < cache <= max_length:
            raise ValueError(f"SoftOverlongPunishment needs 0 < cache <= max_length, got {cache} and {max_length}")
        self.max_length, self.cache = max_length, cache

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        lengths = _column(columns, "completion_lengths", len(completions), "SoftOverlongPunishment")
        start = self.max_length - self.cache
        return [0.0 if n <= start else (start - n) / self.cache if n <= self.max_length else -1.0 for n in lengths]


class TruncationPenalty:
    """``penalty`` for a completion cut by ``max_new_tokens`` before it finished (no EOS, no stop string), 0
    otherwise: the "penalise" alternative to masking truncated completions out of the loss
    (``generation.mask_truncated``), like TRL's ``missing_eos_penalty``. Reads the ``truncated`` column the
    online loop passes.

    >>> TruncationPenalty(penalty=-1.0)(["q"] * 3, ["a", "b", "c"], truncated=[False, True, False])
    [0.0, -1.0, 0.0]
    """

    def __init__(self, penalty: float = -1.0):
        self.penalty = float(penalty)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        cut = _column(columns, "truncated", len(completions), "TruncationPenalty")
        return [self.penalty if bool(t) else 0.0 for t in cut]
