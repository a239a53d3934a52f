"""The benchmark's markdown report: the throughput table, the step-1 and set-up checks, the notes."""

from __future__ import annotations

import math
from typing import Any


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


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
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
        f"posttrain layout: {s.get('layout', 'auto')} requested; in force: "
        + ", ".join(
            f"{row['method']}-{row['size']} {row['raw'].get('posttrain', {}).get('layout') or '?'}"
            for row in report["rows"]
        )
        + ".",
        "",
        "samples/s: pairs/s (DPO, IPO, ORPO, SimPO), examples/s (KTO), completions/s (GRPO). tokens/s: non-padding "
        "prompt + completion tokens of the trained rows (a pair's prompt counts twice, whether or not a tool "
        "computes it twice). MFU: (6N x computed trained tokens + 2N x no-grad tokens) / time / peak, N = "
        "parameters without the input embedding; a prompt that posttrain's shared_prefix layout computes once "
        "counts once. x = posttrain / TRL.",
        "",
        "| method | model | reference | samples/s posttrain | samples/s TRL | x | tokens/s posttrain | tokens/s TRL "
        "| x | peak RSS GiB posttrain | peak RSS GiB TRL | x | MFU posttrain | MFU TRL | x |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        p, t = row["figures"].get("posttrain", {}), row["figures"].get("trl", {})
        mfu_p = p.get("mfu") and 100 * p["mfu"]
        mfu_t = t.get("mfu") and 100 * t["mfu"]
        lines.append(
            f"| {row['method']} | {row['size']} | {REFERENCE_LABEL[row['reference']]} "
            f"| {fmt(p.get('samples_per_s'), 2)} | {fmt(t.get('samples_per_s'), 2)} "
            f"| {ratio(p.get('samples_per_s'), t.get('samples_per_s'))} "
            f"| {fmt(p.get('tokens_per_s'), 0)} | {fmt(t.get('tokens_per_s'), 0)} "
            f"| {ratio(p.get('tokens_per_s'), t.get('tokens_per_s'))} "
            f"| {fmt(p.get('peak_rss_gib'), 2)} | {fmt(t.get('peak_rss_gib'), 2)} "
            f"| {ratio(p.get('peak_rss_gib'), t.get('peak_rss_gib'))} "
            f"| {fmt(mfu_p, 1)}% | {fmt(mfu_t, 1)}% | {ratio(p.get('mfu'), t.get('mfu'))} |"
        )
    lines += [
        "",
        "Step 1 (same weights, same data; order may differ) and set-up checks:",
        "",
        "| method | model | reference | step-1 loss posttrain | step-1 loss TRL | same | step-1 grad norm posttrain "
        "| step-1 grad norm TRL | token ids identical (TRL rows) | precompute s posttrain | precompute s TRL "
        "| median step s posttrain | median step s TRL |",
        "|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
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
        lines.append(
            f"| {row['method']} | {row['size']} | {REFERENCE_LABEL[row['reference']]} "
            f"| {fmt(p.get('step1_loss'), 6)} | {fmt(t.get('step1_loss'), 6)} "
            f"| {same_loss(p.get('step1_loss'), t.get('step1_loss'))} "
            f"| {fmt(p.get('step1_grad_norm'), 4)} | {fmt(t.get('step1_grad_norm'), 4)} | {same_ids} "
            f"| {pre_p} | {pre_t} | {fmt(p.get('median_step_s'), 3)} | {fmt(t.get('median_step_s'), 3)} |"
        )
    failed = [f"{row['method']}-{row['size']}-{row['reference']} {tool}: {r.get('error', '')[-400:]}"
              for row in report["rows"] for tool, r in row["raw"].items() if not r.get("ok")]  # fmt: skip
    if failed:
        lines += ["", "Failed runs (see the JSON for the log tail):", ""] + [f"- {f.splitlines()[0]}" for f in failed]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def grpo_token_check(row: dict[str, Any], report: dict[str, Any]) -> str:
    """GRPO: completion lengths of both tools (fixed length expected) instead of a token-id comparison."""
    p = row["figures"].get("posttrain", {}).get("mean_completion_length")
    t = row["figures"].get("trl", {}).get("mean_completion_length")
    return f"n/a (mean completion length {fmt(p, 1)} vs {fmt(t, 1)})"
