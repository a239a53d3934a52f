"""What a frontier writes: frontier.json, frontier.md, frontier.html (inline SVG) and frontier.png.

Rows are points: the starting model (KL 0) and each measured model of each run. The plot has KL(policy ||
reference) per completion on x and the mean held-out reward on y, every curve starting at the starting
model's point, as Fig. 2 of the DPO paper (Rafailov et al. 2023) draws it: one colour per method (a run's
``method``: ``grpo``, ``online dpo``, ``offline dpo``, ...; its label in a result written before runs named
one), that method's best run at equal KL bold and in the legend, its other runs (other strengths, a sweep's
variants) pale underneath, so a grid of forty runs still reads as one curve per method. frontier.png needs
matplotlib (``pip install 'posttrain[plot]'``), imported here only, when the PNG is written; the HTML page
needs nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from posttrain.frontier.budget import best_per_method, describe, method_of
from posttrain.machine import summary
from posttrain.report.svg import COLOURS, Line, chart

MARKERS = ("o", "s", "^", "D")  # the PNG's marker per turn of the colour palette

X_LABEL = "KL(policy || reference), nats per completion"
PLOT_INSTALL = "pip install 'posttrain[plot]'"
FAINT = "pale: the method's other runs (frontier.md lists every run)"


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    start = {"label": "start", "run": "start", "strength": "", "step": 0, **result["start"]}
    return [start, *({"label": r["label"], "run": r["run"], "strength": r["strength"], **p}
                     for r in result["runs"] for p in r["points"])]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The table: one row per point, the figures with their standard errors."""
    decoding = result.get("decoding")  # (absent from the records of grids measured before it was written)
    decoded = (f", at most {decoding['max_new_tokens']} new tokens, decoded {decoding['batch_size']} at a time (the "
               "grid's shared `generation`: the batch size changes the draws)") if decoding else ""  # fmt: skip
    lines = [
        f"# Reward against KL: {result['output_dir']}",
        "",
        f"Held-out prompts: `{result['data']}`, {result['samples']} sample(s) each at temperature 1, top_p 1, "
        f"top_k 0, seed {result['seed']}{decoded}. KL: nats per completion on the policy's own samples (mean ± s.e.).",
        "",
    ]
    rows = _rows(result)
    machines = list(dict.fromkeys(_machine(row) for row in rows))
    several = len(machines) > 1
    if several:
        lines += [f"Measured on {len(machines)} machines (column `on`). Another machine samples other completions "
                  "from the same model and seed: compare points measured on one machine.", ""]  # fmt: skip
        lines += [f"{n}. {m}" for n, m in enumerate(machines, 1)] + [""]
    else:
        lines += [f"Measured on: {machines[0]}.", ""]
    lines += _budget_table(result)
    on = " on |" if several else ""
    lines += [
        "| method | run | strength | step | reward | KL (nats) | distinct-2 | length (tokens) |" + on,
        "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if several else ""),
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['run']} | {row['strength']} | {row['step']} | "
            f"{row['reward']:.3f} ± {row['reward_se']:.3f} | {row['kl']:.2f} ± {row['kl_se']:.2f} | "
            f"{row['distinct_2']:.3f} | {row['completion_length']:.1f} |"
            + (f" {machines.index(_machine(row)) + 1} |" if several else "")
        )
    return "\n".join(lines) + "\n"


def _budget_cells(result: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    """(run, one cell per KL budget) for each run: :func:`posttrain.frontier.budget.describe`."""
    return [(run, [describe(f) for f in run.get("kl_budgets", [])]) for run in result["runs"]]


def _budget_table(result: dict[str, Any]) -> list[str]:
    """The runs compared at equal KL (``frontier.kl_budgets``), before the points; none without budgets."""
    budgets = result.get("kl_budgets") or []
    if not budgets:
        return []
    lines = [
        "Best reward within a KL budget: on each run's path (the starting model, then its points in step order, "
        "joined by straight lines) the highest held-out reward at a KL of at most the budget, at a point (its "
        "step) or on the line between two (their steps, reward and s.e. interpolated); `ends at`: the run stops "
        "short of the budget. The best of several noisy points leans upwards: read differences under two "
        "standard errors as ties.",
        "",
        "| method | run |" + "".join(f" KL <= {b:g} |" for b in budgets),
        "|---|---|" + "---:|" * len(budgets),
    ]
    lines += [f"| {run['label']} | {run['run']} |" + "".join(f" {c} |" for c in cells)
              for run, cells in _budget_cells(result)]  # fmt: skip
    return [*_method_table(result, budgets), *lines, ""]


def _method_table(result: dict[str, Any], budgets: list[float]) -> list[str]:
    """Per method and budget, the best of its runs (named): the comparison a sweep of many runs per method is
    read for; none when every method has one run (the table of runs says it all)."""
    counts = Counter(method_of(run) for run in result["runs"])  # in the order the methods first appear
    if all(n == 1 for n in counts.values()):
        return []
    best = [best_per_method(result["runs"], i) for i in range(len(budgets))]
    lines = ["Each method's best run within a KL budget (the best of its runs, named; every run below):", "",
             "| method | runs |" + "".join(f" KL <= {b:g} |" for b in budgets),
             "|---|---:|" + "---:|" * len(budgets)]  # fmt: skip
    for method, n in counts.items():
        row = f"| {method} | {n} |"
        for i, per_method in enumerate(best):
            run = per_method[method]
            figure = run["kl_budgets"][i]
            row += f" {describe(figure)}, {run['run']} |" if figure["reward"] is not None else " - |"
        lines.append(row)
    return [*lines, ""]


def _machine(row: dict[str, Any]) -> str:
    """The machine that measured a point, in one line (points cached before it was recorded: unrecorded)."""
    return summary(row["machine"]) if row.get("machine") else "unrecorded (cached before points named their machine)"


@dataclass(frozen=True)
class Curve:
    """One run on the plot: ``turn`` counts how often the palette has wrapped before its method (its colour
    repeats an earlier method's; the PNG's marker tells them apart); ``faint`` for a method's runs other than
    its best (:func:`posttrain.frontier.budget.best_per_method`), drawn thin and pale, without a legend entry."""

    legend: str
    colour: str
    turn: int
    points: list[tuple[float, float]]
    faint: bool


def _curves(result: dict[str, Any]) -> list[Curve]:
    """One colour per method, the starting point first, then each run's points in step order: a grid of many
    runs per method (a sweep) reads as one bold curve per method, its best, over its other runs' pale ones."""
    best = best_per_method(result["runs"])
    methods = list(best)
    start = (result["start"]["kl"], result["start"]["reward"])
    out = []
    for run in result["runs"]:
        method = method_of(run)
        turn, colour_index = divmod(methods.index(method), len(COLOURS))
        name = f"{run['label']} {run['strength']}".strip()
        legend = name if method == run["label"] else f"{method}: {name}"
        path = [start, *((p["kl"], p["reward"]) for p in run["points"])]
        out.append(Curve(legend, COLOURS[colour_index], turn, path, run is not best[method]))
    return out


def html(result: dict[str, Any]) -> str:
    """A self-contained page: the plot (inline SVG), the table and a few samples per point."""
    curves = _curves(result)
    lines = [
        Line(c.legend, c.colour, list(c.points), faint=c.faint) for c in sorted(curves, key=lambda c: not c.faint)
    ]  # the pale ones underneath
    svg = chart("held-out reward against KL to the reference", lines, x_label=X_LABEL)
    legend = "".join(f'<li><svg width="28" height="10"><line x1="0" x2="28" y1="5" y2="5" stroke="{c.colour}" '
                     f'stroke-width="2"/></svg> {escape(c.legend)}</li>'
                     for c in curves if not c.faint)  # fmt: skip
    if any(c.faint for c in curves):
        legend += f"<li>{escape(FAINT)}</li>"
    table = ["<table><tr><th>method</th><th>run</th><th>step</th><th>reward</th><th>KL</th><th>distinct-2</th>"
             "<th>samples</th></tr>"]  # fmt: skip
    for row in _rows(result):
        shown = "".join(f"<div class=s><b>{r['reward']:+.2f}</b> {escape(r['prompt'])}<i>{escape(r['completion'])}</i>"
                        "</div>" for r in row.get("shown", []))  # fmt: skip
        table.append(f"<tr><td>{escape(row['label'])}</td><td>{escape(row['run'])}</td><td>{row['step']}</td>"
                     f"<td>{row['reward']:.3f} ± {row['reward_se']:.3f}</td><td>{row['kl']:.2f} ± {row['kl_se']:.2f}"
                     f"</td><td>{row['distinct_2']:.3f}</td><td>{shown}</td></tr>")  # fmt: skip
    table.append("</table>")
    budgets = result.get("kl_budgets") or []
    if budgets:
        head = "".join(f"<th>KL &le; {b:g}</th>" for b in budgets)
        rows = "".join(f"<tr><td>{escape(run['label'])}</td><td>{escape(run['run'])}</td>"
                       + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"
                       for run, cells in _budget_cells(result))  # fmt: skip
        table.insert(0, f"<h2>Best reward within a KL budget</h2><table><tr><th>method</th><th>run</th>{head}</tr>"
                        f"{rows}</table><h2>Points</h2>")  # fmt: skip
    style = ("body{font:14px sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}.s{font-size:12px;margin:2px 0}"
             "i{color:#555}ul{list-style:none;padding:0}svg.chart{width:640px;height:auto}"
             ".grid{stroke:#eee}.frame{fill:none;stroke:#999}.tick,.axis,.note{font-size:10px}"
             ".title{font-size:12px}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset=utf-8><title>frontier</title><style>{style}</style></head>"
            f"<body><h1>Reward against KL</h1><p>{escape(markdown(result).splitlines()[2])}</p>{svg}<ul>{legend}</ul>"
            f"{''.join(table)}</body></html>\n")  # fmt: skip


def png(result: dict[str, Any], path: Path) -> str | None:
    """The plot as a PNG; None when written, else why not (matplotlib missing), in one line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"frontier.png not written: it needs matplotlib ({PLOT_INSTALL}); frontier.html has the plot"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves = sorted(_curves(result), key=lambda c: not c.faint)  # the pale ones underneath
    for c in curves:
        xs, ys = [x for x, _ in c.points], [y for _, y in c.points]
        if c.faint:
            ax.plot(xs, ys, color=c.colour, linewidth=0.8, alpha=0.3, marker="", label="_nolegend_")
            continue
        # A grid with more methods than colours repeats a colour: the marker tells the two apart.
        marker = MARKERS[c.turn % len(MARKERS)]
        ax.plot(xs, ys, marker=marker, color=c.colour, linewidth=1.8, label=c.legend)
    if any(c.faint for c in curves):
        ax.plot([], [], color="#777777", linewidth=0.8, alpha=0.5, label=FAINT)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel("mean held-out reward")
    ax.grid(alpha=0.3)
    # Beside the axes, not on them: a legend inside covers the high-reward corner the plot is read for.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return None


def write_all(result: dict[str, Any], folder: Path) -> list[str]:
    """frontier.json, .md, .html and .png in ``folder``; returns notes (a PNG that could not be written)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("frontier.json", json.dumps(result, indent=1) + "\n"), ("frontier.md", markdown(result)),
                       ("frontier.html", html(result))):  # fmt: skip
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)
    note = png(result, folder / "frontier.png")
    return [note] if note else []
