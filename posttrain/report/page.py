"""The report page: one self-contained HTML file (inline CSS and SVG; no script, nothing fetched).

Each section shows its runs overlaid, one colour per run: what moved (the first and last training loss, the
held-out figures before and after), the training curves, the held-out table, sample completions, and each
run's config and summary.
"""

from __future__ import annotations

import datetime
import json
import math
from html import escape
from typing import Any

import yaml

from posttrain.report.figures import HEADLINE, better, first_last, panels_for
from posttrain.report.runs import Run, Section
from posttrain.report.svg import COLOURS, DASHES, Line, chart, number, swatch

TEXT_LIMIT = 600
"""Characters of a prompt or completion shown in the table (the file keeps up to 2,000)."""

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1360px;
       padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 19px; border-bottom: 2px solid #ddd;
     padding-bottom: 4px; margin-top: 36px; } h3 { font-size: 15px; margin: 22px 0 8px; }
.meta, .hint { color: #666; } .legend span { margin-right: 18px; white-space: nowrap; }
.charts { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; border: 1px solid #e4e4e4;
          border-radius: 4px; background: #fff; } figcaption { font-size: 12px; padding: 0 8px 6px; color: #555; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #444; } svg.chart text.title { font-size: 12.5px;
                 font-weight: 600; fill: #222; } svg.chart .grid { stroke: #eee; } svg.chart .frame { fill: none;
                 stroke: #bbb; } svg.chart text.note { fill: #888; } svg.swatch { vertical-align: middle; }
table { border-collapse: collapse; margin: 4px 0 8px; } th, td { border: 1px solid #ddd; padding: 3px 8px;
        text-align: left; vertical-align: top; } th { background: #f5f5f5; } td.num { text-align: right;
        font-variant-numeric: tabular-nums; white-space: nowrap; }
.up { color: #08753b; } .down { color: #b3261e; } .text { white-space: pre-wrap; font-family: ui-monospace,
      monospace; font-size: 12px; max-width: 520px; overflow-wrap: anywhere; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; } details { margin: 4px 0; }
ul.glance li { margin: 3px 0; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return escape(str(value)) if value is not None else "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return number(float(value)) if abs(value) >= 1e4 or 0 < abs(value) < 1e-3 else f"{value:.4g}"


def _change(key: str, before: float, after: float) -> str:
    """``before -> after`` with an arrow, green when it moved the good way, red the bad one."""
    direction = better(key) * ((after > before) - (after < before))
    css = ' class="up"' if direction > 0 else ' class="down"' if direction < 0 else ""
    arrow = "&#9650;" if after > before else "&#9660;" if after < before else "="
    return f"{_fmt(before)} &rarr; {_fmt(after)} <span{css}>{arrow}</span>"


def _glance(run: Run) -> str:
    """One line per run: the training loss first and last, the lead held-out figures before and after."""
    items = []
    loss = first_last(run, "loss")
    if loss:
        first, last, n = loss
        span = f" (mean of the first and last {n} logged steps)" if n > 1 else ""
        items.append(f"training loss {_change('loss', first, last)}{span}")
    before, after = run.summary.get("heldout_before") or {}, run.summary.get("heldout_after") or {}
    for key in [k for k in HEADLINE if k in after][:3]:
        if key in before:
            items.append(f"held-out {escape(key)} {_change(key, before[key], after[key])}")
        else:
            items.append(f"held-out {escape(key)} {_fmt(after[key])}")
    if not items:
        items.append("no figures yet")
    return "; ".join(items)


def _legend(runs: list[Run]) -> str:
    spans = [f"<span>{swatch(COLOURS[i % len(COLOURS)])} <b>{escape(r.name)}</b> ({escape(r.method)}, "
             f"{len(r.series('loss', 'train')) or 'no'} logged steps)</span>" for i, r in enumerate(runs)]  # fmt: skip
    spans.append(f"<span>{swatch('#666')} train</span><span>{swatch('#666', '2 2', marker=True)} eval</span>")
    return f'<p class="legend">{"".join(spans)}</p>'


def _charts(runs: list[Run]) -> str:
    figures = []
    for panel in panels_for(runs):
        lines, shown = [], []
        for i, run in enumerate(runs):
            colour = COLOURS[i % len(COLOURS)]
            for j, key in enumerate(panel.keys):
                for split in panel.splits:
                    points = run.series(key, split)
                    if points:
                        shown += [key] if key not in shown else []
                        label = f"{run.name}: {key}" + (" (eval)" if split == "eval" else "")
                        lines.append(Line(label, colour, points, DASHES[j % len(DASHES)], markers=split == "eval"))
        svg = chart(panel.title, lines)
        if not svg:
            continue
        caption = ""
        if len(shown) > 1:
            keys = [f"{swatch('#555', DASHES[panel.keys.index(k) % len(DASHES)])} {escape(k)}" for k in shown]
            caption = f"<figcaption>{' &nbsp; '.join(keys)}</figcaption>"
        figures.append(f"<figure>{svg}{caption}</figure>")
    return f'<div class="charts">{"".join(figures)}</div>' if figures else '<p class="hint">No figures logged.</p>'


def _heldout(runs: list[Run]) -> str:
    with_eval = [r for r in runs if r.summary.get("heldout_after")]
    if not with_eval:
        return '<p class="hint">No held-out evaluation (no <code>data.eval</code>, or the run has not finished).</p>'
    keys: list[str] = []
    for run in with_eval:
        keys += [k for k in run.summary["heldout_after"] if k not in keys]
    head = "".join(f'<th colspan="2">{escape(r.name)}</th>' for r in with_eval)
    sub = "<th>before</th><th>after</th>" * len(with_eval)
    rows = []
    for key in keys:
        cells = []
        for run in with_eval:
            before, after = run.summary.get("heldout_before") or {}, run.summary["heldout_after"]
            b, a = before.get(key), after.get(key)
            moved = ""
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and better(key) and a != b:
                moved = ' class="num up"' if better(key) * (a - b) > 0 else ' class="num down"'
            cells.append(f'<td class="num">{_fmt(b)}</td><td{moved or " class=num"}>{_fmt(a)}</td>')
        rows.append(f"<tr><th>{escape(key)}</th>{''.join(cells)}</tr>")
    return (f'<table class="heldout"><tr><th rowspan="2">figure</th>{head}</tr><tr>{sub}</tr>{"".join(rows)}'
            "</table>")  # fmt: skip


def _text(value: Any) -> str:
    if isinstance(value, list):  # a conversation: its messages, one per line
        value = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                          for m in value)  # fmt: skip
    text = "" if value is None else str(value)
    cut = text[:TEXT_LIMIT] + (" [...]" if len(text) > TEXT_LIMIT else "")
    return f'<td class="text">{escape(cut)}</td>'


def _completions(runs: list[Run]) -> str:
    sampled = [r for r in runs if r.completions]
    if not sampled:
        return ""
    several = len(sampled) > 1
    terms = sorted({k for r in sampled for row in r.completions for k in (row.get("rewards") or {})})
    extra = [c for c in ("advantage", "kind") if any(c in row for r in sampled for row in r.completions)]
    head = ("<th>run</th>" if several else "") + "<th>step</th><th>prompt</th><th>completion</th><th>reward</th>"
    head += "".join(f"<th>{escape(t)}</th>" for t in terms if len(terms) > 1) + "".join(f"<th>{c}</th>" for c in extra)
    rows = []
    for run in sampled:
        for row in run.completions:
            cells = f"<td>{escape(run.name)}</td>" if several else ""
            cells += f'<td class="num">{_fmt(row.get("step"))}</td>{_text(row.get("prompt"))}'
            cells += f'{_text(row.get("completion"))}<td class="num">{_fmt(row.get("reward"))}</td>'
            if len(terms) > 1:
                cells += "".join(f'<td class="num">{_fmt((row.get("rewards") or {}).get(t))}</td>' for t in terms)
            cells += "".join(f'<td class="num">{_fmt(row.get(c))}</td>' for c in extra)
            rows.append(f"<tr>{cells}</tr>")
    return (f"<h3>Sample completions</h3><p class=\"hint\">The first step's and the last steps' samples "
            f"(completions.jsonl).</p><table class=\"completions\"><tr>{head}</tr>{''.join(rows)}</table>")  # fmt: skip


def _files(runs: list[Run]) -> str:
    out = []
    for run in runs:
        config = yaml.safe_dump(run.config, sort_keys=False) if run.config else "(no config.yaml)"
        summary = json.dumps(run.summary, indent=2) if run.summary else "(no summary.json: the run has not finished)"
        out.append(f"<details><summary>{escape(run.name)}: config.yaml ({escape(str(run.path))})</summary>"
                   f'<pre class="config">{escape(config)}</pre></details>'
                   f"<details><summary>{escape(run.name)}: summary.json</summary>"
                   f'<pre class="summary">{escape(summary)}</pre></details>')  # fmt: skip
    return "".join(out)


def _section(section: Section, index: int) -> str:
    runs = section.runs
    methods = ", ".join(dict.fromkeys(r.method for r in runs))
    title = f"stage {section.title} ({methods})" if section.title else f"{', '.join(r.name for r in runs)} ({methods})"
    glance = "".join(f"<li>{swatch(COLOURS[i % len(COLOURS)])} <b>{escape(r.name)}</b>: {_glance(r)}</li>"
                     for i, r in enumerate(runs))  # fmt: skip
    return (f'<section id="s{index}"><h2>{escape(title)}</h2>{_legend(runs)}<h3>At a glance</h3>'
            f'<ul class="glance">{glance}</ul><h3>Training curves</h3>{_charts(runs)}'
            f"<h3>Held-out figures, before and after training</h3>{_heldout(runs)}{_completions(runs)}"
            f"<h3>Config and summary</h3>{_files(runs)}</section>")  # fmt: skip


def page(sections: list[Section]) -> str:
    """The whole report."""
    runs = list(dict.fromkeys(str(r.path) for s in sections for r in s.runs))
    nav = ""
    if len(sections) > 1:
        links = " &middot; ".join(f'<a href="#s{i}">{escape(s.title or "runs")}</a>' for i, s in enumerate(sections))
        nav = f"<p>Stages: {links}</p>"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>posttrain report: {escape(', '.join(dict.fromkeys(r.name for s in sections for r in s.runs)))}</title>"
        f"<style>{CSS}</style></head><body><h1>posttrain report</h1>"
        f'<p class="meta">{len(runs)} run folder{"s" if len(runs) != 1 else ""}, drawn {when}. Hover a point for its '
        f"value.</p>{nav}{''.join(_section(s, i) for i, s in enumerate(sections))}</body></html>\n"
    )
