"""``posttrain recommend FILE``: which post-training method suits a data file, and a config to start from.

The shape comes from the columns (keys holding a value in at least one row); the first rule that matches wins:

1. ``chosen`` and ``rejected``: preference pairs, strings or message lists; without ``prompt`` the prompt is
   their shared prefix. Scores come from a column pair such as ``score_chosen``/``score_rejected`` or
   ``chosen_score``/``rejected_score`` (also with ``rating`` or ``reward``), when present.
2. ``prompt``, ``completion`` and ``label``: unpaired binary feedback (KTO); a true label is desirable.
3. ``messages``, or ``prompt`` and ``completion``: demonstrations (SFT).
4. ``prompt`` and a reference-answer column (see ``ANSWER_COLUMNS``), no completion: prompts with a verifier
   (online RL with a rule-based reward).

Anything else raises :class:`DataError` naming the file and the columns seen (exit status 2 in the CLI).
The signals are pure functions over all rows; their thresholds are the constants below, explained in
docs/algorithms.md ("Choosing a method").
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from posttrain.algorithms import ALGORITHMS
from posttrain.algorithms.kto import KTO_RANGE, kto_weights  # noqa: F401 - (KTO_RANGE: re-exported)
from posttrain.data.formats import DataError, read_rows

Shape = Literal["preference", "unpaired", "demonstrations", "verifier"]
SHAPE_NAMES = {
    "preference": "preference pairs (prompt, chosen, rejected)",
    "implicit": "preference pairs (chosen, rejected; the prompt is their shared prefix)",
    "unpaired": "unpaired binary feedback (prompt, completion, label)",
    "demonstrations": "demonstrations (prompt and completion, or messages)",
    "verifier": "prompts with a reference answer (verifier)",
}
MODEL = "embedded:smollm2-135m-instruct"
ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "final_answer", "reference_answer", "target")
SCORE_COLUMNS = tuple(
    pair
    for w in ("score", "rating", "reward")
    for pair in ((f"{w}_chosen", f"{w}_rejected"), (f"chosen_{w}", f"rejected_{w}"))
)
MIN_ROWS = 100  # fewer rows than this: a few steps memorise them; preference papers use thousands
LONGER_SHARE = 0.6  # chosen longer in more than this share of pairs: length bias ...
LENGTH_RATIO = 1.3  # ... or mean chosen length over mean rejected length above this
TINY_MARGIN = 0.1  # a score margin smaller than this fraction of the scores' std is a near-tie
NOISY_SHARE = 0.1  # score ties, near-ties and inverted margins above this share: noisy labels


@dataclass(frozen=True)
class Method:
    name: str
    reason: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """Whether this version of posttrain trains it (looked up at run time, so new methods show up)."""
        return self.name in ALGORITHMS


@dataclass(frozen=True)
class Report:
    source: str
    shape: Shape
    columns: list[str]
    rows: int
    checks: list[tuple[str, str]]
    warnings: list[str]
    methods: list[Method]


@dataclass(frozen=True)
class LengthBias:
    """Completion lengths in characters over ``n`` pairs; ``ratio`` is mean chosen over mean rejected."""

    n: int
    mean_chosen: float
    mean_rejected: float
    chosen_longer: int
    rejected_longer: int

    @property
    def ratio(self) -> float:
        return self.mean_chosen / self.mean_rejected if self.mean_rejected else math.inf

    @property
    def biased(self) -> bool:
        return self.n > 0 and (self.chosen_longer / self.n > LONGER_SHARE or self.ratio > LENGTH_RATIO)


@dataclass(frozen=True)
class Margins:
    """Score margins (chosen - rejected): ``ties`` = 0, ``tiny`` 0 < |m| < threshold, ``inverted`` m <= -threshold."""

    n: int
    std: float
    threshold: float
    ties: int
    tiny: int
    inverted: int

    @property
    def unreliable(self) -> float:
        return (self.ties + self.tiny + self.inverted) / self.n if self.n else 0.0

    @property
    def flip_rate(self) -> float:
        """Estimated label-flip rate: a tie or near-tie is a coin flip (1/2), an inverted margin a flip (1)."""
        return (0.5 * (self.ties + self.tiny) + self.inverted) / self.n if self.n else 0.0


Findings = tuple[list[tuple[str, str]], list[str], list[Method]]
"""(check lines, warnings, methods best first) from one shape's analysis."""


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The keys that hold a value (not None) in at least one row, in order of first appearance."""
    return list(dict.fromkeys(k for row in rows for k, v in row.items() if v is not None))


def detect_shape(columns: Iterable[str]) -> Shape | None:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    if "messages" in cols or {"prompt", "completion"} <= cols:
        return "demonstrations"
    if "prompt" in cols and any(c in cols for c in ANSWER_COLUMNS):
        return "verifier"
    return None


def share(n: int, total: int) -> str:
    return f"{n} ({n / total:.1%})" if total else str(n)


def length_bias(pairs: Sequence[tuple[str, str]]) -> LengthBias:
    n = len(pairs)
    return LengthBias(
        n=n,
        mean_chosen=sum(len(c) for c, _ in pairs) / n if n else 0.0,
        mean_rejected=sum(len(r) for _, r in pairs) / n if n else 0.0,
        chosen_longer=sum(len(c) > len(r) for c, r in pairs),
        rejected_longer=sum(len(c) < len(r) for c, r in pairs),
    )


def score_margins(scores: Sequence[tuple[float, float]]) -> Margins:
    std = statistics.pstdev([s for pair in scores for s in pair]) if scores else 0.0
    threshold = TINY_MARGIN * std
    margins = [c - r for c, r in scores]
    return Margins(
        n=len(margins),
        std=std,
        threshold=threshold,
        ties=sum(m == 0 for m in margins),
        tiny=sum(0 < abs(m) < threshold for m in margins),
        inverted=sum(m <= -threshold and m != 0 for m in margins),
    )


def duplicates(keys: Iterable[str]) -> int:
    """How many keys repeat an earlier one."""
    keys = list(keys)
    return len(keys) - len(set(keys))


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and not _text(value).strip())


def _number(value: Any) -> float | None:
    try:  # CSV gives strings; a bool is not a score
        return None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _label(value: Any) -> bool | None:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    return {"true": True, "false": False, "1": True, "0": False}.get(str(value).strip().lower())


def _shared_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _prompt_key(row: dict[str, Any]) -> str:
    """The prompt for duplicate counting: ``prompt``, all but the last message, or the pair's shared prefix."""
    if "prompt" in row or "messages" in row:
        return _text(row.get("prompt")) if "prompt" in row else _text((row.get("messages") or [])[:-1])
    c, r = _text(row.get("chosen")).strip(), _text(row.get("rejected")).strip()
    return c[: _shared_prefix(c, r)]


def _preference(rows: list[dict[str, Any]], cols: list[str], full: list[dict[str, Any]]) -> Findings:
    """Pairs: ties, length bias, score margins; ``full`` are the rows with no empty field."""
    pairs = []
    for r in full:  # completions only: an implicit prompt (the shared prefix) is cut off
        c, j = _text(r["chosen"]).strip(), _text(r["rejected"]).strip()
        cut = 0 if "prompt" in cols else _shared_prefix(c, j)
        pairs.append((c[cut:], j[cut:]))
    n, ties, lb = len(rows), sum(c == j for c, j in pairs), length_bias(pairs)
    checks = [
        ("chosen == rejected", share(ties, n)),
        ("chosen longer / rejected longer", f"{share(lb.chosen_longer, lb.n)} / {share(lb.rejected_longer, lb.n)}"),
        ("mean length chosen, rejected", f"{lb.mean_chosen:.1f}, {lb.mean_rejected:.1f} chars (ratio {lb.ratio:.2f})"),
    ]
    warn = [f"{ties} pairs have chosen == rejected: nothing to learn, and the row checks reject them"] if ties else []
    if lb.biased:
        warn.append(
            f"length bias: chosen is longer in {lb.chosen_longer / lb.n:.0%} of pairs (limit {LONGER_SHARE:.0%}), "
            f"mean ratio {lb.ratio:.2f} (limit {LENGTH_RATIO}): a policy can gain reward by writing more; "
            "prefer length-normalised SimPO or IPO, or rebalance the pairs"
        )
    noisy, eps = False, 0.1
    score_cols = next((p for p in SCORE_COLUMNS if set(p) <= set(cols)), None)
    if score_cols:
        scored = [(_number(r.get(score_cols[0])), _number(r.get(score_cols[1]))) for r in rows]
        m = score_margins([(c, j) for c, j in scored if c is not None and j is not None])
        checks += [
            ("score columns", f"{score_cols[0]}, {score_cols[1]} ({m.n} scored pairs, std {m.std:.3g})"),
            ("score ties", share(m.ties, m.n)),
            (f"tiny margins, 0 < |m| < {m.threshold:.3g}", share(m.tiny, m.n)),
            ("chosen scored lower", share(m.inverted, m.n)),
        ]
        noisy, eps = m.unreliable > NOISY_SHARE, min(0.4, max(0.05, round(m.flip_rate, 2)))
        if noisy:
            warn.append(
                f"noisy labels: {m.unreliable:.0%} of scored pairs are ties, tiny or inverted margins "
                f"(limit {NOISY_SHARE:.0%}); estimated flip rate {m.flip_rate:.0%}"
            )
    methods = []
    if lb.biased:
        methods.append(Method("simpo", "length bias: per-token mean rewards, a longer chosen earns nothing"))
        methods.append(
            Method("ipo", "length_normalize: true, a per-token margin (raise beta)", {"length_normalize": True})
        )
    if noisy:
        ls = {"label_smoothing": eps}
        methods.append(Method("cdpo", f"noisy labels: DPO on soft labels, label_smoothing {eps}", ls))
        methods.append(Method("robust_dpo", f"noisy labels: unbiased under random flips at rate {eps}", ls))
        methods.append(Method("dpo", "beta 0.5: conservative, stays near the reference", {"beta": 0.5}))
    else:
        methods.append(Method("dpo", "clean pairs: the reference-anchored baseline, beta 0.1", {"beta": 0.1}))
    if rows and all(_number(r.get("margin")) is not None for r in rows):
        methods.append(Method("distill", "every pair has a margin: beta * h is regressed onto it, no infinite margins"))
    if not lb.biased:
        methods.append(Method("simpo", "no reference model: saves its memory and forward pass"))
    methods.append(Method("orpo", "no reference and no SFT stage: SFT on chosen plus an odds-ratio term"))
    if not lb.biased:
        methods.append(Method("ipo", "bounded margin: resists overfitting near-deterministic preferences"))
    methods.append(Method("kto", "split each pair into a desirable and an undesirable example (weights 1:1)"))
    methods.append(Method("reward", "a reward model on these pairs, for PPO, GRPO or best-of-n"))
    return checks, warn, methods


def _unpaired(rows: list[dict[str, Any]]) -> Findings:
    """KTO's class balance, and prompts that have both labels (which could be paired for DPO)."""
    labels = [_label(r.get("label")) for r in rows]
    n_d, n_u = labels.count(True), labels.count(False)
    both: dict[str, set[bool]] = {}
    for r, lab in zip(rows, labels, strict=True):
        if lab is not None:
            both.setdefault(_text(r.get("prompt")), set()).add(lab)
    pairable = sum(len(s) == 2 for s in both.values())
    checks = [
        ("labels not true/false", share(len(rows) - n_d - n_u, len(rows))),
        ("desirable / undesirable", f"{n_d} / {n_u}"),
        ("prompts with both labels", str(pairable)),
    ]
    warn, weights = [], {}
    if n_d and n_u:
        lam_d, lam_u = kto_weights(n_d, n_u)
        weights = {"desirable_weight": lam_d, "undesirable_weight": lam_u}
        ratio = lam_d * n_d / (lam_u * n_u)
        checks.append(("suggested KTO weights", f"lambda_D {lam_d}, lambda_U {lam_u} (ratio {ratio:.2f})"))
    else:
        warn.append("only one class of label: KTO needs both desirable and undesirable examples")
    methods = [
        Method("kto", "unpaired binary feedback is KTO's data; weights balance the classes", {"beta": 0.1, **weights})
    ]
    if pairable:
        methods.append(Method("dpo", f"{pairable} prompts have both labels: pair them into chosen/rejected rows"))
    methods.append(Method("sft", "on the desirable rows only (filter label == true first), as a first stage"))
    return checks, warn, methods


DEMONSTRATIONS = [
    Method("sft", "demonstrations: imitate them first"),
    Method("dpo", "then, from the SFT model (also the reference), on pairs you collect"),
]


def _verifier(answer: str) -> list[Method]:
    return [
        Method("grpo", f"a rule-based reward checks completions against {answer!r}; no value model"),
        Method("rloo", "the same data with a leave-one-out baseline over k samples per prompt"),
        Method("iterative_dpo", "sample k completions, pair right against wrong by the verifier, DPO; repeat"),
        Method("ppo", "works with the rule-based reward too, but needs a value model"),
    ]


def analyse(rows: list[dict[str, Any]], source: str) -> Report:
    """All the signals and the ranked methods for the rows of ``source`` (pure: no file access)."""
    cols = columns_of(rows)
    shape = detect_shape(cols)
    if shape is None:
        raise DataError(
            f"{source}: cannot tell the data's shape from its columns ({', '.join(cols) or 'none'}); expected "
            "prompt/chosen/rejected, prompt/completion/label, prompt/completion, messages, or prompt + answer"
        )
    answer = next((c for c in ANSWER_COLUMNS if c in cols), "answer")
    required = {
        "preference": ("prompt", "chosen", "rejected") if "prompt" in cols else ("chosen", "rejected"),
        "unpaired": ("prompt", "completion", "label"),
        "demonstrations": ("messages",) if "messages" in cols else ("prompt", "completion"),
        "verifier": ("prompt", answer),
    }[shape]
    n, full = len(rows), [r for r in rows if not any(_empty(r.get(f)) for f in required)]
    dup_rows = duplicates(json.dumps(r, sort_keys=True, default=str) for r in rows)
    checks = [
        (f"rows with an empty field ({', '.join(required)})", share(n - len(full), n)),
        ("duplicate rows", share(dup_rows, n)),
        ("rows repeating a prompt", share(duplicates(_prompt_key(r) for r in rows), n)),
    ]
    warn = [f"only {n} rows (fewer than {MIN_ROWS}): a few steps memorise them; hold some out"] if n < MIN_ROWS else []
    if len(full) < n:
        warn.append(f"{n - len(full)} rows have an empty or missing field: the row checks reject them; drop or fill")
    if dup_rows:
        warn.append(f"{dup_rows} rows are exact copies of earlier ones, so they weigh double: deduplicate")
    if shape == "preference":
        more, more_warn, methods = _preference(rows, cols, full)
    elif shape == "unpaired":
        more, more_warn, methods = _unpaired(rows)
    else:
        more, more_warn, methods = [], [], DEMONSTRATIONS if shape == "demonstrations" else _verifier(answer)
    return Report(source, shape, cols, n, checks + more, warn + more_warn, methods)


def starting_config(report: Report, split: str = "train") -> dict[str, Any]:
    """A config for the top method: with every hyperparameter of its class when posttrain trains it."""
    top = report.methods[0]
    data: dict[str, Any] = {"train": report.source} | ({"split": split} if split != "train" else {})
    config: dict[str, Any] = {"method": top.name, "model": MODEL, "data": data, "output_dir": f"runs/{top.name}"}
    config["batch_size"] = min(8, report.rows)
    cls = ALGORITHMS.get(top.name)
    if cls is None:
        return config | top.hyperparameters  # a sketch: the method's keys are not known yet
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            config[f.name] = top.hyperparameters.get(f.name, f.default)
    alg = cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})
    if not alg.uses_reference("copy") and alg.reference_refusal("none") is None:  # (GRPO with beta > 0: copy)
        config["reference"] = "none"
    return config


def render(report: Report, split: str = "train") -> list[str]:
    implicit = report.shape == "preference" and "prompt" not in report.columns
    shape = SHAPE_NAMES["implicit" if implicit else report.shape]
    lines = [f"data:    {report.source}" + (f" (split {split})" if split != "train" else "")]
    lines += [f"shape:   {shape}", f"columns: {', '.join(report.columns)}", f"rows:    {report.rows}"]
    width = max(len(name) for name, _ in report.checks)
    lines += ["", "checks"] + [f"  {name:<{width}}  {value}" for name, value in report.checks]
    lines += ["", "warnings"] + ([f"  - {w}" for w in report.warnings] or ["  none"])
    lines += ["", "suited methods, best first"]
    for i, m in enumerate(report.methods, start=1):
        lines.append(f"  {i}. {m.name + ('' if m.available else ' (coming)'):<22} {m.reason}")
    top = report.methods[0]
    lines.append("")
    if top.available:
        lines.append(f"starting config for {top.name}: save as run.yaml and run `posttrain train run.yaml`")
    else:
        lines.append(f"starting config for {top.name} (coming: this version of posttrain cannot train it; a sketch)")
    lines += yaml.safe_dump(starting_config(report, split), sort_keys=False).rstrip("\n").splitlines()
    return lines


def recommend(source: str, split: str = "train") -> list[str]:
    """Read every row of ``source`` and return the printable report."""
    rows = []
    for number, row in read_rows(source, split):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {number}: expected an object with named fields, got {type(row).__name__}")
        rows.append(dict(row))
    if not rows:
        raise DataError(f"{source}: no rows")
    return render(analyse(rows, source), split)
