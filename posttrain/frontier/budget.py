"""The best held-out reward a run reaches within a KL budget: methods compared at equal KL.

A run's path is the starting model (KL 0) followed by its measured points in step order, joined by straight
lines, as the plot draws it. Within a budget of ``b`` nats per completion the run offers every point whose
KL is at most ``b`` and, where a line crosses ``b``, the point on that line at exactly ``b`` (reward and its
standard error interpolated linearly between the two measured ends). The best of those is what a user who
keeps that checkpoint (or trains to that KL) gets for the budget: the figure the DPO paper's Fig. 2 is read
for (Rafailov et al. 2023, Sec. 6.1: reward at equal KL to the reference). It is the highest of several
noisy points, so it leans upwards by up to about a standard error: a difference under two standard errors
is a tie.
"""

from __future__ import annotations

import itertools
from typing import Any


def best_within(start: dict[str, Any], points: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """The best reward on the path ``start, *points`` at a KL of at most ``budget`` (``budget > 0``).

    Each point is a mapping with ``step``, ``kl``, ``reward`` and ``reward_se`` (``start`` has step 0).
    Returns ``{"kl": budget, "reward", "reward_se", "steps", "reached", "path_kl"}``: ``steps`` is the
    point's step, or the two steps whose line it lies on; ``reached`` whether the path gets as far as the
    budget (when it does not, the best point of a path that stops short); ``path_kl`` the path's largest KL.

    >>> a = {"step": 0, "kl": 0.0, "reward": 0.1, "reward_se": 0.04}
    >>> b = {"step": 10, "kl": 8.0, "reward": 0.7, "reward_se": 0.02}
    >>> c = {"step": 20, "kl": 12.0, "reward": 0.9, "reward_se": 0.04}
    >>> best_within(a, [b, c], 10.0)
    {'kl': 10.0, 'reward': 0.8, 'reward_se': 0.03, 'steps': [10, 20], 'reached': True, 'path_kl': 12.0}
    """
    if not budget > 0:
        raise ValueError(f"a KL budget must be > 0, got {budget!r}")
    path = [{**start, "step": start.get("step", 0)}, *points]
    candidates = [(p["reward"], p["reward_se"], [p["step"]]) for p in path if p["kl"] <= budget]
    for a, b in itertools.pairwise(path):
        if (a["kl"] - budget) * (b["kl"] - budget) < 0:  # the line from a to b crosses the budget
            w = (budget - a["kl"]) / (b["kl"] - a["kl"])
            reward = a["reward"] + w * (b["reward"] - a["reward"])
            se = (1 - w) * a["reward_se"] + w * b["reward_se"]
            candidates.append((reward, se, [a["step"], b["step"]]))
    end = max(p["kl"] for p in path)
    if not candidates:  # every point, the start included, above the budget (the k1 estimate of a tiny KL)
        return {"kl": budget, "reward": None, "reward_se": None, "steps": [], "reached": True, "path_kl": end}
    reward, se, steps = max(candidates, key=lambda c: c[0])
    return {"kl": budget, "reward": round(reward, 6), "reward_se": round(se, 6), "steps": steps,
            "reached": end >= budget, "path_kl": end}  # fmt: skip


def describe(figure: dict[str, Any]) -> str:
    """One table cell: ``0.828 ± 0.026 (steps 60-75)``; a path that stops short says where it ends."""
    if figure["reward"] is None:
        return "-"
    where = "step" if len(figure["steps"]) == 1 else "steps"
    text = f"{figure['reward']:.3f} ± {figure['reward_se']:.3f} ({where} {'-'.join(map(str, figure['steps']))})"
    return text if figure["reached"] else f"{text}, ends at {figure['path_kl']:.2f}"


def method_of(run: dict[str, Any]) -> str:
    """A result run's method (``online dpo``, ``grpo``, ...); a result written before runs named one: its label."""
    return str(run.get("method") or run["label"])


def _score(run: dict[str, Any], budget: int) -> float:
    """What ranks a method's runs: the reward within its ``budget``-th KL budget, else the best measured reward."""
    budgets = run.get("kl_budgets") or []
    if budgets:
        best = budgets[budget]["reward"]
        return float("-inf") if best is None else float(best)
    return max((p["reward"] for p in run["points"]), default=float("-inf"))


def best_per_method(runs: list[dict[str, Any]], budget: int = -1) -> dict[str, dict[str, Any]]:
    """Each method's best run, in the order the methods first appear: the one with the highest reward within
    the ``budget``-th KL budget (an index into each run's ``kl_budgets``; the largest by default; without
    budgets, the highest reward measured); the earlier run on a tie.

    >>> runs = [{"label": "a", "method": "grpo", "kl_budgets": [{"reward": 0.6}, {"reward": 0.7}]},
    ...         {"label": "b", "method": "ppo", "kl_budgets": [{"reward": 0.5}, {"reward": 0.6}]},
    ...         {"label": "c", "method": "grpo", "kl_budgets": [{"reward": 0.5}, {"reward": 0.8}]}]
    >>> {m: r["label"] for m, r in best_per_method(runs).items()}
    {'grpo': 'c', 'ppo': 'b'}
    >>> {m: r["label"] for m, r in best_per_method(runs, 0).items()}
    {'grpo': 'a', 'ppo': 'b'}
    """
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        method = method_of(run)
        if method not in best or _score(run, budget) > _score(best[method], budget):
            best[method] = run
    return best
