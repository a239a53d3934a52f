"""Rewards named in a config, loaded and combined: ``{name: numeric_answer, weight: 1.0}`` -> one callable.

:func:`load_reward` builds a reward from a config entry (a built-in name or an import path);
:class:`CombinedReward` adds weighted rewards up, keeps each one's values for logging, and turns a failing
or ill-behaved reward into a :class:`RewardError` that names it and the sample.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from posttrain.rewards.rules import RewardFn


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
        values = list(returned)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(returned).__name__}, not a list of floats", name) from None
    if len(values) != len(prompts):
        raise RewardError(f"reward {name!r} returned {len(values)} values for {len(prompts)} samples", name)
    scores = []
    for i, value in enumerate(values):
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise RewardError(f"reward {name!r} returned {value!r} for {where(i)}", name, i, str(prompts[i])[:80])
        scores.append(score)
    return scores


def _fails_alone(
    fn: RewardFn, i: int, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
) -> bool:
    try:
        fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
    except Exception:
        return True
    return False


BUILTIN_REWARDS = {
    "numeric_answer": "posttrain.rewards.rules:NumericAnswer",
    "regex_format": "posttrain.rewards.rules:RegexFormat",
    "length_penalty": "posttrain.rewards.rules:LengthPenalty",
    "overlong": "posttrain.rewards.rules:SoftOverlongPunishment",
    "truncation_penalty": "posttrain.rewards.rules:TruncationPenalty",
    "reward_model": "posttrain.rewards.model:RewardModelScorer",
}


class NamedReward(NamedTuple):
    name: str
    fn: RewardFn
    weight: float


def load_reward(spec: str | Mapping[str, Any]) -> NamedReward:
    """A reward from a config entry ``{name: ..., weight: 1.0, label: ..., **options}`` (or just its name).

    ``name`` is a built-in (:data:`BUILTIN_REWARDS`) or an import path, ``"package.module:attr"`` or
    ``"package.module.attr"``. A class is built with ``options`` as keyword arguments; a function is used
    as is and takes no options. ``label`` (default: ``name``) is the name it is logged under.

    >>> load_reward({"name": "numeric_answer", "weight": 2.0, "column": "solution"}).fn.column
    'solution'
    >>> load_reward("posttrain.rewards.rules:RegexFormat")
    Traceback (most recent call last):
    ValueError: reward 'posttrain.rewards.rules:RegexFormat': missing a required argument: 'pattern'
    """
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    name, weight, label = options.pop("name", None), options.pop("weight", 1.0), options.pop("label", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a reward entry needs a 'name' (one of {sorted(BUILTIN_REWARDS)} or an import path)")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
    target = _import(name, BUILTIN_REWARDS.get(name, name))
    if inspect.isclass(target):
        try:
            inspect.signature(target).bind(**options)
        except TypeError as err:
            raise ValueError(f"reward {name!r}: {err}") from None
        fn = target(**options)
    elif options:
        raise ValueError(f"reward {name!r} is not a class, so it takes no options; got {sorted(options)}")
    else:
        fn = target
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable: {fn!r}")
    return NamedReward(label or name, fn, float(weight))


def load_rewards(specs: Sequence[str | Mapping[str, Any]]) -> CombinedReward:
    """:func:`load_reward` on each config entry, combined."""
    return CombinedReward([load_reward(spec) for spec in specs])


def _import(name: str, path: str) -> Any:
    module_name, sep, attrs = path.partition(":")
    if not sep:
        module_name, _, attrs = path.rpartition(".")
    if not module_name or not attrs:
        known = ", ".join(sorted(BUILTIN_REWARDS))
        raise ValueError(f"unknown reward {name!r}: not a built-in ({known}) nor 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {name!r}: cannot import {module_name!r} ({err})") from None
    for attr in attrs.split("."):
        if not hasattr(target, attr):
            raise ValueError(f"reward {name!r}: {module_name!r} has no attribute {attrs!r}")
        target = getattr(target, attr)
    return target
