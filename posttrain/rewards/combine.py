"""Rewards named in a config, loaded and combined: ``{name: numeric_answer, weight: 1.0}`` -> one callable.

:func:`load_reward` builds a reward from a config entry (a built-in name or an import path);
:class:`CombinedReward` adds weighted rewards up, keeps each one's values for logging, and turns a failing
or ill-behaved reward into a :class:`RewardError` that names it and the sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from posttrain.data.formats import DataError
from posttrain.rewards.rules import RewardFn
from posttrain.rewards.specs import BUILTIN_REWARDS as BUILTIN_REWARDS  # its home before specs.py
from posttrain.rewards.specs import LOOP_COLUMNS, check_options, construct, required_columns, resolve, split_entry

if TYPE_CHECKING:
    from posttrain.data.prompts import PromptRecord


class RewardError(RuntimeError):
    """A reward failed, or returned a wrong count or a non-finite value; the message names the reward and,
    where one is to blame, the sample (index and the first 80 characters of its prompt)."""

    def __init__(self, message: str, reward: str, index: int | None = None, prompt: str | None = None):
        super().__init__(message)
        self.reward, self.index, self.prompt = reward, index, prompt


@dataclass(frozen=True)
class RewardScores:
    total: list[float]  # the weighted sum, one per sample
    per_reward: dict[str, list[float]]  # each reward's own (unweighted) values, for logging


class CombinedReward:
    """The weighted sum of named rewards, ``total[i] = sum_k weight_k * reward_k[i]``, checked on the way.

    :meth:`score` also returns each reward's own values. A reward that raises becomes a :class:`RewardError`
    naming it and the first sample that fails alone (each sample is retried alone to find it); returning
    the wrong number of values, or a NaN or infinity, is a :class:`RewardError` too. A weight of 0 logs a
    reward without training on it.

    >>> from posttrain.rewards.rules import NumericAnswer, RegexFormat
    >>> combined = CombinedReward([("correct", NumericAnswer(), 1.0), ("format", RegexFormat(r"answer is"), 0.5)])
    >>> combined.score(["1+1?", "1+1?"], ["The answer is 2.", "3"], answer=["2", "2"])
    RewardScores(total=[1.5, 0.0], per_reward={'correct': [1.0, 0.0], 'format': [1.0, 0.0]})
    """

    def __init__(self, rewards: Sequence[tuple[str, RewardFn, float]]):
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        names = [name for name, _, _ in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique (give one a 'label'), got {names}")
        for name, fn, weight in rewards:
            if not callable(fn) or not math.isfinite(weight):
                raise ValueError(f"reward {name!r}: needs a callable and a finite weight, got {fn!r} and {weight}")
        self.rewards = [(name, fn, float(weight)) for name, fn, weight in rewards]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        return self.score(prompts, completions, **columns).total

    def check_columns(self, source: str, prompts: Sequence[PromptRecord]) -> None:
        """Every data column a reward reads (:func:`~posttrain.rewards.specs.required_columns`) is in each of
        the ``prompts`` read from ``source``, with a value the reward's ``check_column(name, value)`` (if it
        has one) finds nothing wrong with: else a DataError naming the row, the reward and the column, before
        anything samples.

        >>> from posttrain.data.prompts import PromptRecord
        >>> from posttrain.rewards.rules import NumericAnswer
        >>> rows = [PromptRecord((1,), "q", 0, {"answer": "4"}, row=1)]
        >>> CombinedReward([("correct", NumericAnswer(column="solution"), 1.0)]).check_columns("d.jsonl", rows)
        Traceback (most recent call last):
        posttrain.data.formats.DataError: d.jsonl: row 1: reward 'correct' needs the column 'solution' (columns: answer)
        """
        for name, fn, _ in self.rewards:
            for column in required_columns(fn):
                if column in LOOP_COLUMNS:
                    continue
                lacking = next((p.row for p in prompts if p.columns.get(column) is None), None)
                if lacking is not None:
                    seen = ", ".join(sorted({k for p in prompts for k in p.columns})) or "none"
                    raise DataError(
                        f"{source}: row {lacking}: reward {name!r} needs the column {column!r} (columns: {seen})"
                    )
                check = getattr(fn, "check_column", None)  # a reward may judge the values too
                if not callable(check):
                    continue
                for p in prompts:
                    problem = check(column, p.columns[column])
                    if problem:
                        raise DataError(f"{source}: row {p.row}: field {column!r}: {problem} (read by reward {name!r})")

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> RewardScores:
        n = len(prompts)
        for key, values in {"completions": completions, **columns}.items():
            if len(values) != n:
                raise ValueError(f"{n} prompts but {len(values)} values in {key!r}")
        per_reward = {name: _checked(name, fn, prompts, completions, columns) for name, fn, _ in self.rewards}
        total = [sum(weight * per_reward[name][i] for name, _, weight in self.rewards) for i in range(n)]
        return RewardScores(total, per_reward)


def _checked(
    name: str, fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
) -> list[float]:
    def where(i: int) -> str:
        return f"sample {i} (prompt {str(prompts[i])[:80]!r})"

    try:
        returned = fn(prompts, completions, **columns)
    except Exception as err:
        index = next((i for i in range(len(prompts)) if _fails_alone(fn, i, prompts, completions, columns)), None)
        place = where(index) if index is not None else f"a batch of {len(prompts)} (no sample fails alone)"
        prompt = str(prompts[index])[:80] if index is not None else None
        raise RewardError(
            f"reward {name!r} failed on {place}: {type(err).__name__}: {err}", name, index, prompt
        ) from err
    try:
        if isinstance(returned, (str, bytes, Mapping)):  # iterable, but never one value per sample
            raise TypeError
        values = list(returned)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(returned).__name__}, not a list of floats", name) from None
    if len(values) != len(prompts):
        raise RewardError(f"reward {name!r} returned {len(values)} values for {len(prompts)} samples", name)
    scores = []
    for i, value in enumerate(values):
        # A number (numpy's and one-element tensors' too); never a string that happens to read as one, nor None.
        score = _as_float(value)
        if not math.isfinite(score):
            raise RewardError(
                f"reward {name!r} returned {value!r} ({type(value).__name__}, not a finite float) for {where(i)}",
                name, i, str(prompts[i])[:80],
            )  # fmt: skip
        scores.append(score)
    return scores


def _as_float(value: Any) -> float:
    """``value`` as a float when it is a number (it has ``__float__``: str and None do not), else NaN."""
    if not hasattr(value, "__float__"):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values
        return math.nan


def _fails_alone(
    fn: RewardFn, i: int, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
) -> bool:
    try:
        fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
    except Exception:
        return True
    return False


class NamedReward(NamedTuple):
    name: str
    fn: RewardFn
    weight: float


def load_reward(spec: str | Mapping[str, Any], folders: Sequence[Path] = ()) -> NamedReward:
    """A reward from a config entry ``{name: ..., weight: 1.0, label: ..., **options}`` (or just its name).

    ``name`` is a built-in (:data:`BUILTIN_REWARDS`) or an import path, ``"package.module:attr"`` or
    ``"package.module.attr"``, its module looked for in ``folders``, the current directory, then the installed
    packages (:mod:`posttrain.rewards.specs`). A class is built with ``options`` as keyword arguments; a
    function is used as is and takes no options. ``label`` (default: ``name``) is the name it is logged under.
    Every mistake is a ValueError naming the reward.

    >>> load_reward({"name": "numeric_answer", "weight": 2.0, "column": "solution"}).fn.column
    'solution'
    >>> load_reward("posttrain.rewards.rules:RegexFormat")
    Traceback (most recent call last):
    ValueError: reward 'posttrain.rewards.rules:RegexFormat': missing a required argument: 'pattern'
    """
    name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, Mapping) else None
    try:
        name, weight, label, options = split_entry(spec)
        target = resolve(name, folders)
        fn = construct(target, check_options(target, options))
    except ValueError as err:
        raise ValueError(f"reward {name!r}: {err}" if isinstance(name, str) else str(err)) from err
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable: {fn!r}")
    return NamedReward(label or name, fn, weight)


def load_rewards(specs: Sequence[str | Mapping[str, Any]], folders: Sequence[Path] = ()) -> CombinedReward:
    """:func:`load_reward` on each config entry, combined."""
    return CombinedReward([load_reward(spec, folders) for spec in specs])
