"""Which lever bought what: posttrain alone on the benchmark's fixtures, the levers switched on one at a time.

    python3 benchmarks/levers.py [--methods dpo,kto,grpo] [--steps 8] [--warmup 2] [--size 5m] [--out DIR]

Every row is one posttrain run (the child and the figures of run.py: samples/s with a cold cache's
precomputation amortised, MFU on the tokens the forwards compute, peak RSS of the process). The rows of a
method add one lever each to the row above, and ``x`` is the speed-up over the method's first row. Levers
that are always on (the LM head projects completion positions only, in chunks; no full-vocabulary logits)
are in every row. TRL is not run here: run.py measures the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench_peak import measure_peak
from bench_runs import Case, figures, run_child
from bench_settings import parse_args
from run import build_fixtures

HERE = Path(__file__).resolve().parent

# (label, layout, reference mode, generation batch) per method, each adding one lever to the row above.
VARIANTS: dict[str, list[tuple[str, str, str, int | None]]] = {
    "dpo": [
        ("frozen reference scored every step, padded rows", "padded", "copy", None),
        ("+ reference log-probs precomputed once (cold cache)", "padded", "cold", None),
        ("+ packed rows (no padding, attention per sequence)", "packed", "cold", None),
        ("+ chosen and rejected share the prompt", "shared_prefix", "cold", None),
        ("+ cache warm (a second run on the same data)", "shared_prefix", "warm", None),
    ],
    "kto": [
        ("frozen reference scored every step, padded rows", "padded", "copy", None),
        ("+ reference log-probs precomputed once (cold cache)", "padded", "cold", None),
        ("+ packed rows", "packed", "cold", None),
    ],
    "grpo": [
        ("padded rows, 16 completions per generate call", "padded", "online", 16),
        ("+ the whole rollout in one generate call", "padded", "online", 0),
        ("+ each group's prompt shared in scoring", "shared_prefix", "online", 0),
    ],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="dpo,kto,grpo")
    p.add_argument("--size", default="5m", choices=["5m", "42m"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(VARIANTS))
    if unknown:
        p.error(f"levers are listed for {', '.join(VARIANTS)}, not {unknown}")
    base, _ = parse_args(["--methods", ",".join(methods), "--sizes", a.size, "--steps", str(a.steps),
                          "--warmup", str(a.warmup), "--ref-modes", "cold,warm,copy"])  # fmt: skip
    sys.path.insert(0, str(HERE))
    work = a.workdir
    fx = build_fixtures(base, work / "fixtures")
    peak = measure_peak(base.threads, base.peak_seconds, base.peak_n)["flops"]
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    for method in methods:
        first = None
        for i, (label, layout, ref, gen_batch) in enumerate(VARIANTS[method]):
            model_key = "5m-gen" if method == "grpo" else a.size
            case = Case(method, a.size, ref, model_key, {"kto": "kto", "grpo": "prompts"}.get(method, "prefs"))
            grpo = dict(base.grpo, generation_batch_size=gen_batch)
            s = dataclasses.replace(base, layout=layout, grpo=grpo)
            # A warm row reuses the cache of the cold row above it; every other row starts cold.
            run_work = work / f"{method}-{i - 1 if ref == 'warm' else i}"
            started = time.perf_counter()
            r = run_child("posttrain", case, s, fx, run_work)
            f = figures(r, case, s, fx["models"][model_key]["non_embedding"], peak)
            if not r["ok"]:
                print(f"{method}: {label}: FAILED ({r['log']})", flush=True)
                continue
            first = first or f["samples_per_s"]
            rows.append({"method": method, "lever": label, "layout": r.get("layout"), "reference": ref, **f,
                         "x": f["samples_per_s"] / first})  # fmt: skip
            print(f"{method}: {label}: {f['samples_per_s']:.2f} samples/s, MFU {f['mfu']:.1%}, peak RSS "
                  f"{f['peak_rss_gib']:.2f} GiB ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    lines = [
        f"# posttrain levers, {a.size} model, {a.warmup} warm-up + {a.steps} timed steps, fp32, "
        f"{base.threads} threads, peak {peak / 1e9:.1f} GFLOP/s",
        "",
        "| method | lever | layout | reference | samples/s | x | MFU | peak RSS GiB | step-1 loss |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['lever']} | {row['layout']} | {row['reference']} | "
                     f"{row['samples_per_s']:.2f} | {row['x']:.2f} | {row['mfu']:.1%} | {row['peak_rss_gib']:.2f} | "
                     f"{row['step1_loss']:.6f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-levers-{a.size}"
    (a.out / f"{stem}.md").write_text(text)
    (a.out / f"{stem}.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {a.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
