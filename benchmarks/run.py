"""posttrain vs TRL 1.16 on identical fixtures, in one command.

    python3 benchmarks/run.py [--quick] [--methods dpo,ipo,kto,orpo,simpo,grpo] [--sizes 5m,42m] [--steps 20]
                              [--out benchmarks/results]
    python3 benchmarks/run.py --gpu [--quick] [--batch-sizes 8,32] [--budget SECONDS]     # CUDA, bf16, 300M

Builds the fixtures once (a 4096-token tokenizer, Llama models from a fixed seed saved to a temporary
directory, length-controlled data), measures the matmul peak of this machine (fp32 on the CPU; with ``--gpu``
bf16 on the GPU, in its own process), then trains every method with each tool in its own subprocess
(posttrain first, then TRL, on the same files), and prints and writes a markdown table (``OUT/<date>.md``,
``OUT/<date>-quick.md`` for ``--quick``, ``OUT/<date>-gpu.md`` for ``--gpu``) and the raw figures (``.json``).
See benchmarks/README.md for what is measured and how. This process never imports TRL; child_trl.py does.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_peak import measure_peak, peak_in_child, settle_load  # benchmarks/ is on sys.path: python3 benchmarks/run.py
from bench_runs import Case, figures, plan, run_child
from bench_settings import Settings, parse_args, resolve_device
from report import markdown, write_report

HERE = Path(__file__).resolve().parent
TOOLS = ("posttrain", "trl")


# ---- fixtures


def build_fixtures(s: Settings, work: Path) -> dict[str, Any]:
    """Tokenizer, models and data on disk; the token ids posttrain will train on (for the parity check)."""
    import bench_fixtures as bf
    import torch

    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    tokenizer = bf.build_tokenizer()
    models: dict[str, dict[str, Any]] = {}
    for key in sorted({case.model_key for case in plan(s)}):
        # "5m-gen": the 5M model whose EOS/PAD cannot be sampled (GRPO's fixed generation length)
        model = bf.build_model(tokenizer, key.removesuffix("-gen"), seed=s.seed, no_eos=key.endswith("-gen"))
        models[key] = {"dir": str(bf.save_model(model, tokenizer, work / "models" / key)),
                       **bf.parameter_counts(model)}  # fmt: skip
        del model
    total_steps = s.warmup + s.steps
    data: dict[int, dict[str, Any]] = {}
    for batch in s.batches:  # one data set per batch size: a run is exactly one epoch of its own data
        folder = work / "data" / f"b{batch}"
        files = bf.build_data(
            tokenizer, folder, n_pairs=batch * total_steps,
            n_prompts=s.grpo_for(batch)["prompts_per_step"] * total_steps, prompt_range=s.prompt_range,
            completion_range=s.completion_range, seed=s.seed,
        )  # fmt: skip
        # KTO: batch pairs give 2 x batch unpaired rows; with the default kto batch the run is one epoch.
        ids = bf.posttrain_token_ids(tokenizer, files, s.max_length, seed=s.seed)
        lengths = bf.check_lengths(ids, s.prompt_range, s.completion_range)
        ids_file = folder / "posttrain_ids.json"
        ids_file.write_text(json.dumps(ids))
        data[batch] = {"files": files, "ids_file": str(ids_file), "lengths": lengths}
    lengths = {key: [min(d["lengths"][key][0] for d in data.values()), max(d["lengths"][key][1] for d in data.values())]
               for key in ("prompt_tokens", "completion_tokens")}  # fmt: skip
    return {"models": models, "data": data, "lengths": lengths, "vocab_size": len(tokenizer),
            "build_s": time.perf_counter() - t0}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    s, a = parse_args(argv, __doc__)
    sys.path.insert(0, str(HERE))
    if s.gpu:
        resolve_device(s)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", flush=True)
    started = time.perf_counter()
    stem = datetime.date.today().isoformat() + ("-gpu" if s.gpu else "") + ("-quick" if s.quick else "")
    stem += "" if s.layout == "auto" else f"-layout-{s.layout}"
    try:
        fx = build_fixtures(s, work)
        sizes_text = ", ".join(
            f"{k} ({v['total'] / 1e6:.1f}M, N={v['non_embedding'] / 1e6:.2f}M)" for k, v in fx["models"].items()
        )
        print(f"fixtures: vocab {fx['vocab_size']}, models {sizes_text}, prompt tokens "
              f"{fx['lengths']['prompt_tokens']}, completion tokens {fx['lengths']['completion_tokens']} "
              f"({fx['build_s']:.0f} s)", flush=True)  # fmt: skip
        device: dict[str, Any] = {}
        if s.gpu:  # no waiting for the load to settle: the GPU does the work, and the time is the lease's
            load_before = os.getloadavg()[0]
            measured = peak_in_child(s, work, "before") or {  # no peak: MFU n/a, the rest still measured
                "flops": float("nan"), "n": s.peak_n, "threads": s.threads, "seconds": s.peak_seconds,
                "device": s.device, "dtype": "bfloat16", "device_info": {},
            }  # fmt: skip
            device = measured.pop("device_info")
            peak = {**measured, "flops_before": measured["flops"], "flops_after": None}
            print(f"bf16 matmul peak on {device.get('name')}: {peak['flops'] / 1e12:.1f} TFLOP/s", flush=True)
        else:
            load_before = settle_load()
            peak = measure_peak(s.threads, s.peak_seconds, s.peak_n)
            print(f"fp32 matmul peak on {s.threads} threads: {peak['flops'] / 1e9:.1f} GFLOP/s "
                  f"(load average {load_before:.2f})", flush=True)  # fmt: skip
        rows: list[dict[str, Any]] = []
        cases = plan(s)
        left_out: list[str] = []
        last_case_s = 0.0
        for case in cases:
            if s.budget_s is not None and time.perf_counter() - started + last_case_s > s.budget_s:
                left_out.append(case.label)
                print(f"[{time.perf_counter() - started:6.0f} s] {case.label}: left out (budget)", flush=True)
                continue
            case_start = time.perf_counter()
            row: dict[str, Any] = {"method": case.method, "size": case.size, "reference": case.reference,
                                   "model_key": case.model_key, "raw": {}, "figures": {}}  # fmt: skip
            if case.batch:
                row["batch"] = case.batch
            n_params = fx["models"][case.model_key]["non_embedding"]
            for tool in TOOLS:
                print(f"[{time.perf_counter() - started:6.0f} s] {case.label}: {tool} ...", end=" ", flush=True)
                r = run_child(tool, case, s, fx, work)
                row["raw"][tool] = r
                row["figures"][tool] = figures(r, case, s, n_params, peak["flops"])
                f = row["figures"][tool]
                if r["ok"]:
                    gib = f.get("peak_gpu_allocated_gib")
                    memory = f" peak GPU {gib:.2f} GiB allocated," if gib is not None else ""
                    print(f"{f['samples_per_s']:.2f} samples/s, {f['tokens_per_s']:.0f} tokens/s,{memory} "
                          f"step-1 loss {f['step1_loss']}, {r['wall_s']:.0f} s", flush=True)  # fmt: skip
                else:
                    print(f"FAILED (exit {r['returncode']}; log: {r['log']})", flush=True)
            rows.append(row)
            last_case_s = time.perf_counter() - case_start
            if s.gpu:  # a run cut short by an outer time limit still leaves the rows done so far
                partial = f"partial: {len(rows)} of {len(cases)} runs done so far"
                write_report(s, a.out, stem, fx, peak, device, rows, [partial], load_before, started)
        # The peak again after the runs (the larger of the two is used: contention only lowers it), and every
        # row's MFU recomputed against it. --gpu: only when the budget leaves time for it.
        if not s.gpu:
            peak_after = measure_peak(s.threads, s.peak_seconds, s.peak_n)
            peak = {**peak, "flops_before": peak["flops"], "flops_after": peak_after["flops"],
                    "flops": max(peak["flops"], peak_after["flops"])}  # fmt: skip
        elif s.budget_s is None or time.perf_counter() - started + 30 < s.budget_s:
            again = peak_in_child(s, work, "after")
            if again is not None:
                best = max(peak["flops"], again["flops"]) if peak["flops"] == peak["flops"] else again["flops"]  # NaN
                peak = {**peak, "flops_after": again["flops"], "flops": best}
        for row in rows:
            case = Case(row["method"], row["size"], row["reference"], row["model_key"], "", row.get("batch"))
            n_params = fx["models"][case.model_key]["non_embedding"]
            row["figures"] = {tool: figures(r, case, s, n_params, peak["flops"]) for tool, r in row["raw"].items()}
        notes = []
        # Only the load before the runs says whether others used the machine: afterwards it is the runs' own.
        if not s.gpu and load_before > 0.5:
            notes.append(
                f"The machine was not idle (1-minute load average {load_before:.2f} before the runs): other "
                "processes shared the CPU, so these timings and the measured peak (hence MFU) are not reliable."
            )
        if "42m" in s.sizes and s.methods != ["dpo"] and not s.gpu:
            notes.append(
                "The 42M model runs DPO only; the other methods run on the 5M model"
                + ("." if "5m" in s.sizes else " (not requested here, so they did not run).")
            )
        if s.gpu:
            notes.append(f"1-minute load average of the host when the runs began: {load_before:.2f}.")
        if left_out:
            notes.append(f"Left out for the time budget ({s.budget_s:g} s): {', '.join(left_out)}.")
        report = write_report(s, a.out, stem, fx, peak, device, rows, notes, load_before, started)
        print()
        print(markdown(report))
        print(f"wrote {a.out / (stem + '.md')} and {a.out / (stem + '.json')} ({report['total_s']:.0f} s in all)")
        return 0 if all(r.get("ok") for row in rows for r in row["raw"].values()) else 1
    finally:
        if a.workdir is None and not a.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
