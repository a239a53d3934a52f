"""The benchmark's report: the markdown (the throughput table, the step-1 and set-up checks, the notes), the
facts of where it ran (machine, versions, the git commit), and the two files written (``write_report``)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_settings import Settings

from posttrain.machine import cpu_model

REPO = Path(__file__).resolve().parent.parent


def same_loss(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    return "yes" if abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b)) else "no"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


REFERENCE_LABEL = {
    "cold": "cached, cold (precompute amortised)",
    "warm": "cached, warm (cache reused)",
    "copy": "frozen copy, scored every step",
    "none": "none (reference-free)",
    "online": "frozen copy (beta 0.04)",
}


def table(columns: list[tuple[str, str]], rows: list[list[str]]) -> list[str]:
    """Markdown table lines: ``columns`` are (title, alignment: "" left or ":" right), each row its cells."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |"]
    lines.append("|" + "|".join("---:" if align == ":" else "---" for _, align in columns) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def trio(p: dict[str, Any], t: dict[str, Any], key: str, digits: int, scale: float = 1.0, suffix: str = "") -> list:
    """posttrain's figure, TRL's and their ratio (of the unscaled figures)."""
    a, b = p.get(key), t.get(key)
    a_shown, b_shown = (a and scale * a), (b and scale * b)
    return [fmt(a_shown, digits) + suffix, fmt(b_shown, digits) + suffix, ratio(a, b)]


def trio_columns(name: str) -> list[tuple[str, str]]:
    return [(f"{name} posttrain", ":"), (f"{name} TRL", ":"), ("x", ":")]


def key_cells(row: dict[str, Any], gpu: bool) -> list[str]:
    """The cells that name a row: method, model, (batch,) reference."""
    batch = [str(row.get("batch"))] if gpu else []
    return [row["method"], row["size"], *batch, REFERENCE_LABEL[row["reference"]]]


def key_columns(gpu: bool) -> list[tuple[str, str]]:
    return [("method", ""), ("model", ""), *([("batch", ":")] if gpu else []), ("reference", "")]


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    gpu = bool(s.get("gpu"))
    lines = gpu_header(report) if gpu else cpu_header(report)
    rows = [row for row in report["rows"] if row.get("raw")]  # a row skipped for the time budget has none
    main: list[list[str]] = []
    for row in rows:
        p, t = row["figures"].get("posttrain", {}), row["figures"].get("trl", {})
        cells = key_cells(row, gpu) + trio(p, t, "samples_per_s", 2)
        if gpu:
            cells += trio(p, t, "peak_gpu_allocated_gib", 2) + trio(p, t, "peak_gpu_reserved_gib", 2)
            cells += trio(p, t, "mfu", 1, 100, "%") + trio(p, t, "peak_rss_gib", 2)
        else:
            cells += trio(p, t, "tokens_per_s", 0) + trio(p, t, "peak_rss_gib", 2) + trio(p, t, "mfu", 1, 100, "%")
        main.append(cells)
    if gpu:
        figures = ["samples/s", "peak GPU allocated GiB", "peak GPU reserved GiB", "MFU", "peak RSS GiB"]
    else:
        figures = ["samples/s", "tokens/s", "peak RSS GiB", "MFU"]
    lines += table(key_columns(gpu) + [c for name in figures for c in trio_columns(name)], main)
    lines += ["", "Step 1 (same weights, same data; order may differ) and set-up checks:", ""]
    checks: list[list[str]] = []
    for row in rows:
        p, t = row["figures"].get("posttrain", {}), row["figures"].get("trl", {})
        rp, rt = row["raw"].get("posttrain", {}), row["raw"].get("trl", {})
        parity = rt.get("token_parity") or {}
        if "identical_rows" in parity:
            same_ids = f"{parity['identical_rows']}/{parity['expected_rows']}"
        else:
            same_ids = parity.get("checked", "n/a")
        if row["method"] == "grpo":
            same_ids = grpo_token_check(row, report)
        pre_p = fmt(rp.get("precompute_s"), 2) if row["reference"] in ("cold", "warm") else "-"
        pre_t = fmt(rt.get("precompute_s"), 2) if row["reference"] in ("cold", "warm") else "-"
        if row["reference"] == "warm":  # did the warm run find the cache the cold run stored?
            pre_p += "" if rp.get("reference_cache_reused") or not rp else " (recomputed)"
            pre_t += "" if rt.get("reference_cache_reused") or not rt else " (recomputed)"
        loss_p, loss_t = p.get("step1_loss"), t.get("step1_loss")
        checks.append([
            *key_cells(row, gpu), fmt(loss_p, 6), fmt(loss_t, 6), same_loss(loss_p, loss_t),
            fmt(p.get("step1_grad_norm"), 4), fmt(t.get("step1_grad_norm"), 4), same_ids, pre_p, pre_t,
            fmt(p.get("median_step_s"), 3), fmt(t.get("median_step_s"), 3),
        ])  # fmt: skip
    check_columns = [("step-1 loss posttrain", ":"), ("step-1 loss TRL", ":"), ("same", ""),
                     ("step-1 grad norm posttrain", ":"), ("step-1 grad norm TRL", ":"),
                     ("token ids identical (TRL rows)", ""), ("precompute s posttrain", ":"),
                     ("precompute s TRL", ":"), ("median step s posttrain", ":"),
                     ("median step s TRL", ":")]  # fmt: skip
    lines += table(key_columns(gpu) + check_columns, checks)
    failed = [f"{row['method']}-{row['size']}-{row['reference']}{'-b' + str(row['batch']) if gpu else ''} {tool}: "
              f"{r.get('error', '')[-400:]}"
              for row in rows for tool, r in row["raw"].items() if not r.get("ok")]  # fmt: skip
    if failed:
        lines += ["", "Failed runs (see the JSON for the log tail):", ""] + [f"- {f.splitlines()[0]}" for f in failed]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def cpu_header(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    return [
        f"# posttrain vs TRL {report['versions'].get('trl', '?')}" + (" — SMOKE RUN (--quick)" if s["quick"] else ""),
        "",
        f"Date: {report['date']}. Machine: {report['machine']}. Threads: {s['threads']}. "
        f"fp32 matmul peak measured in this run: {report['peak']['flops'] / 1e9:.1f} GFLOP/s "
        f"({report['peak']['n']}x{report['peak']['n']} torch.matmul, best of before "
        f"{report['peak']['flops_before'] / 1e9:.1f} and after {report['peak']['flops_after'] / 1e9:.1f}).",
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        f"Steps: {s['warmup']} warm-up + {s['steps']} timed; batch {s['batch_size']} pairs "
        f"(KTO {s['kto_batch_size']} unpaired examples; GRPO {s['grpo']['prompts_per_step']} prompts x "
        f"{s['grpo']['num_generations']} samples of {s['grpo']['max_new_tokens']} tokens); fp32; max_length "
        f"{s['max_length']}; prompts {s['prompt_range'][0]}-{s['prompt_range'][1]} tokens, completions "
        f"{s['completion_range'][0]}-{s['completion_range'][1]} tokens.",
        layout_line(report, gpu=False),
        "",
        "samples/s: pairs/s (DPO, IPO, ORPO, SimPO), examples/s (KTO), completions/s (GRPO). tokens/s: non-padding "
        "prompt + completion tokens of the trained rows (a pair's prompt counts twice, whether or not a tool "
        "computes it twice). MFU: (6N x computed trained tokens + 2N x no-grad tokens) / time / peak, N = "
        "parameters without the input embedding; a prompt that posttrain's shared_prefix layout computes once "
        "counts once. x = posttrain / TRL.",
        "",
    ]


def layout_line(report: dict[str, Any], gpu: bool) -> str:
    s = report["settings"]
    return (
        f"posttrain layout: {s.get('layout', 'auto')} requested; in force: "
        + ", ".join(
            f"{row['method']}-{row['size']}{'-b' + str(row['batch']) if gpu else ''} "
            f"{row['raw'].get('posttrain', {}).get('layout') or '?'}"
            for row in report["rows"]
            if row.get("raw")
        )
        + "."
    )


def gpu_header(report: dict[str, Any]) -> list[str]:
    s, peak, device = report["settings"], report["peak"], report.get("device", {})
    name = device.get("name") or s["device"]
    smoke = ""
    if s["quick"]:
        smoke = " — SMOKE RUN (--quick" + (", on the CPU: no CUDA device)" if s["device"] == "cpu" else ")")
    after = peak.get("flops_after")
    git = report.get("git", {})
    dirty = git.get("dirty") or []
    batches = ", ".join(str(b) for b in s["batch_sizes"])
    return [
        f"# posttrain vs TRL {report['versions'].get('trl', '?')} on {name}, bf16 autocast{smoke}",
        "",
        f"Date: {report['date']}. Device: {name}"
        + (f" (CUDA {device['cuda']}, {device.get('memory_gib', 0):.0f} GiB)" if device.get("cuda") else "")
        + f"; host: {report['machine']}; {s['threads']} threads per process. Commit: {git.get('commit', '?')}"
        + (f" with uncommitted changes to {len(dirty)} files ({', '.join(dirty[:6])})" if dirty else "")
        + ".",
        f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        f"Peak for MFU, measured in this run in its own process: {peak['flops'] / 1e12:.1f} TFLOP/s "
        f"({peak['n']}x{peak['n']} {peak['dtype']} torch.matmul on {peak['device']}, best burst of "
        f"{peak['seconds']:g} s; before the runs {peak['flops_before'] / 1e12:.1f}"
        + (f", after {after / 1e12:.1f}" if after else ", not measured after (time budget)")
        + ").",
        f"Steps: {s['warmup']} warm-up + {s['steps']} timed per run; batch {batches}: pairs (DPO, IPO, SimPO, ORPO), "
        f"twice as many unpaired examples (KTO), prompts x {s['grpo']['num_generations']} samples of "
        f"{s['grpo']['max_new_tokens']} tokens (GRPO); {s['precision']} autocast over fp32 weights in both tools; "
        f"max_length {s['max_length']}; prompts {s['prompt_range'][0]}-{s['prompt_range'][1]} tokens, completions "
        f"{s['completion_range'][0]}-{s['completion_range'][1]} tokens.",
        layout_line(report, gpu=True),
        "",
        "samples/s: pairs/s (DPO, IPO, ORPO, SimPO), examples/s (KTO), completions/s (GRPO), over the wall clock "
        "from the end of the last warm-up optimizer step to the end of the last step, the device synchronised "
        "after every optimizer step in both tools. Peak GPU memory: torch.cuda.max_memory_allocated and "
        "max_memory_reserved, read in each tool's own process after training. MFU: (6N x computed trained tokens "
        "+ 2N x no-grad tokens) / time / the bf16 peak above, N = parameters without the input embedding. "
        "x = posttrain / TRL.",
        "",
    ]


def grpo_token_check(row: dict[str, Any], report: dict[str, Any]) -> str:
    """GRPO: completion lengths of both tools (fixed length expected) instead of a token-id comparison."""
    p = row["figures"].get("posttrain", {}).get("mean_completion_length")
    t = row["figures"].get("trl", {}).get("mean_completion_length")
    return f"n/a (mean completion length {fmt(p, 1)} vs {fmt(t, 1)})"


# ---- facts and files


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("posttrain", "trl", "transformers", "torch", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def git_state() -> dict[str, Any]:
    """The commit measured and the tracked files changed since: from git where the checkout has its .git, else
    from BENCH_GIT_COMMIT / BENCH_GIT_STATUS (benchmarks/fetch_gpu_wheels.sh writes them for the GPU machine,
    whose copy of the tree has no .git)."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit, status = os.environ.get("BENCH_GIT_COMMIT", "unknown"), os.environ.get("BENCH_GIT_STATUS", "")
    return {"commit": commit, "dirty": [line[3:] for line in status.splitlines() if line.strip()]}


def write_report(s: Settings, out: Path, stem: str, fx: dict[str, Any], peak: dict[str, Any],
                 device: dict[str, Any], rows: list[dict[str, Any]], notes: list[str], load_before: float,
                 started: float) -> dict[str, Any]:  # fmt: skip
    """Write OUT/<stem>.md (the tables, as printed) and OUT/<stem>.json (everything); return the report."""
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_before": load_before,
        "versions": versions(),
        "git": git_state(),
        "settings": asdict(s),
        "peak": peak,
        "fixtures": {k: v for k, v in fx.items() if k != "data"},
        "data": {batch: {"lengths": d["lengths"]} for batch, d in fx["data"].items()},
        "rows": rows,
        "notes": notes,
        "total_s": time.perf_counter() - started,
    }
    if s.gpu:
        report["device"] = device
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown(report))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    return report
