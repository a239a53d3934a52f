"""Peak memory per process of DPO runs: full fine-tuning, LoRA, LoRA with a separate reference, QLoRA, and
two processes under ddp and fsdp2. The tables of docs/distributed.md ("Measured") come from this script.

    python3 benchmarks/memory.py [--model 42m|smollm2] [--runs full,lora,lora_ref,qlora,ddp,fsdp2] [--out DIR]

Each row is one ``posttrain train`` process (or one torchrun launch of two) on an otherwise idle machine:
peak RSS is the process's ``ru_maxrss`` (``summary.json``'s ``peak_rss_gb`` is the first process's; under
torchrun every process reports its own in its log line), with its file-backed / anonymous split read from
``/proc/PID/status`` by a sampler every 0.2 s (the fp32 checkpoint's memory-mapped pages are file-backed:
the kernel can drop them, they count in RSS all the same). ``--model 42m``: the benchmark's 42M Llama
(``bench_fixtures``), 8 pairs of 96-128 + 96-128 tokens per step in one forward, ``max_length`` 256, two
steps (the optimizer state exists from the first on). ``--model smollm2``: the embedded SmolLM2-135M-Instruct
on the bundled pairs, 4 pairs per step, ``max_length`` 128, two steps. ``OMP_NUM_THREADS`` is 2 for one
process and 1 each for two. TRL is not run here: run.py compares the tools.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RUNS: dict[str, dict[str, Any]] = {
    "full": {"reference": {"kind": "copy"}},
    "lora": {"lora": {"r": 16}},
    "lora_ref": {"lora": {"r": 16}, "reference": {"model": "MODEL"}},
    "qlora": {"lora": {"r": 16, "load_in_4bit": True}},
    "ddp": {"distributed": {"strategy": "ddp"}},
    "fsdp2": {"distributed": {"strategy": "fsdp2"}},
}
LABELS = {
    "full": "full fine-tuning, reference a frozen copy",
    "lora": "LoRA r 16 (all linear layers), reference = the adapters-off policy",
    "lora_ref": "LoRA r 16 with a separately loaded reference (`reference.model`: the same weights)",
    "qlora": "QLoRA r 16 (`lora.load_in_4bit`), reference = the adapters-off 4-bit base",
    "ddp": "full fine-tuning, two processes, `ddp`",
    "fsdp2": "full fine-tuning, two processes, `fsdp2`",
}


def fixture(model: str, work: Path) -> dict[str, Any]:
    """The run's base config (model and data), building the 42M fixture when asked."""
    if model == "smollm2":
        data = {"train": "bundled:prefs_train.jsonl", "max_length": 128, "max_prompt_length": 64}
        return {"model": "embedded:smollm2-135m-instruct", "data": data, "batch_size": 4}
    sys.path.insert(0, str(HERE))
    import bench_fixtures as bf

    tokenizer = bf.build_tokenizer()
    model_dir = bf.save_model(bf.build_model(tokenizer, "42m"), tokenizer, work / "model-42m")
    files = bf.build_data(tokenizer, work / "data", 64, 8, (96, 128), (96, 128))
    data = {"train": files["prefs"], "max_length": 256, "max_prompt_length": 128}
    return {"model": str(model_dir), "data": data, "batch_size": 8}


def sample(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    """The largest RssAnon and RssFile (KiB) of process ``pid`` and its children, sampled every 0.2 s."""
    while not done.is_set():
        for p in [pid, *children(pid)]:
            try:
                status = Path(f"/proc/{p}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                key = line.split(":")[0]
                if key in ("RssAnon", "RssFile"):
                    peaks[key] = max(peaks.get(key, 0), int(line.split()[1]))
        time.sleep(0.2)


def children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in found] + [g for c in found for g in children(int(c))]


def run(name: str, base: dict[str, Any], work: Path) -> dict[str, Any]:
    two = name in ("ddp", "fsdp2")
    extra = json.loads(json.dumps(RUNS[name]).replace('"MODEL"', json.dumps(base["model"])))
    out = work / f"out-{name}"
    config = {"method": "dpo", **base, "max_steps": 2, "warmup_ratio": 0.0, "output_dir": str(out), **extra}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if two else []
    cmd = [*(launch or [sys.executable]), "-m", "posttrain", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if two else "2"}
    peaks: dict[str, int] = {}
    done = threading.Event()
    started = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        sampler = threading.Thread(target=sample, args=(proc.pid, peaks, done), daemon=True)
        sampler.start()
        log, _ = proc.communicate()
        done.set()
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{name}: posttrain exited {proc.returncode}:\n{log[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [round(m["step_time_s"], 1) for m in steps if m.get("split") == "train"]
    return {
        "run": name, "peak_rss_gib_rank0": summary["peak_rss_gb"], "wall_s": round(wall, 1), "step_times_s": times,
        "rss_anon_gib_max": round(peaks.get("RssAnon", 0) / 2**20, 2),
        "rss_file_gib_max": round(peaks.get("RssFile", 0) / 2**20, 2),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="42m", choices=["42m", "smollm2"])
    p.add_argument("--runs", default="full,lora,lora_ref,qlora,ddp,fsdp2")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-memory"))
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = fixture(args.model, args.workdir)
    rows = []
    print(f"| run ({args.model}) | peak RSS (first process) | max anon / file-backed | step times | wall |")
    print("|---|---|---|---|---|")
    for name in names:
        r = run(name, base, args.workdir)
        rows.append(r)
        times = ", ".join(f"{t} s" for t in r["step_times_s"])
        print(f"| {LABELS[name]} | {r['peak_rss_gib_rank0']:.2f} GiB | {r['rss_anon_gib_max']:.2f} / "
              f"{r['rss_file_gib_max']:.2f} GiB | {times} | {r['wall_s']} s |", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
