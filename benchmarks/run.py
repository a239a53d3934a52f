"""posttrain vs TRL 1.16 on identical fixtures, in one command.

    python3 benchmarks/run.py [--quick] [--methods dpo,ipo,kto,orpo,simpo,grpo] [--sizes 5m,42m] [--steps 20]
                              [--out benchmarks/results]

Builds the fixtures once (a 4096-token tokenizer, Llama models from a fixed seed saved to a temporary
directory, length-controlled data), measures the fp32 matmul peak of this machine, then trains every method
with each tool in its own subprocess (posttrain first, then TRL, on the same files), and prints and writes a
markdown table (``OUT/<date>.md``, ``OUT/<date>-quick.md`` for ``--quick``) and the raw figures (``.json``).
See benchmarks/README.md for what is measured and how. This process never imports TRL; child_trl.py does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from report import markdown  # benchmarks/ is on sys.path: python3 benchmarks/run.py

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("dpo", "ipo", "kto", "orpo", "simpo", "grpo")
WITH_REFERENCE = ("dpo", "ipo", "kto")
TOOLS = ("posttrain", "trl")


@dataclass
class Settings:
    methods: list[str]
    sizes: list[str]
    steps: int
    warmup: int
    batch_size: int
    kto_batch_size: int
    max_length: int
    prompt_range: tuple[int, int]
    completion_range: tuple[int, int]
    threads: int
    lr: float
    seed: int
    ref_modes: list[str]
    quick_ref_modes: bool  # --quick without --ref-modes: the warm run for DPO only
    grpo: dict[str, Any] = field(default_factory=dict)
    peak_seconds: float = 5.0
    peak_n: int = 2048
    child_timeout: int = 3600
    quick: bool = False
    layout: str = "auto"


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 2 timed steps, 5M model, short data")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--sizes", default="5m,42m", help="model sizes: 5m (every method), 42m (DPO only)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps first (default 2; --quick: 1)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the .md and .json go")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every run and of the peak measurement (default 2; --quick: "
                        "$OMP_NUM_THREADS when set, else 2)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (DPO, IPO, ORPO, SimPO)")
    p.add_argument("--kto-batch-size", type=int, default=None,
                   help="unpaired examples per step (default: 2 x batch size, both halves of the pairs)")  # fmt: skip
    p.add_argument("--ref-modes", default=None,
                   help="for dpo/ipo/kto: cold (cached reference computed in the run), warm (cache reused), "
                        "copy (a frozen reference scored every step); default cold,warm (--quick: cold,warm for "
                        "dpo, cold for ipo and kto)")  # fmt: skip
    p.add_argument("--grpo-prompts", type=int, default=None, help="GRPO prompts per step (default 8; --quick: 2)")
    p.add_argument("--grpo-generations", type=int, default=None,
                   help="GRPO samples per prompt (default 4; --quick: 2)")  # fmt: skip
    p.add_argument("--grpo-new-tokens", type=int, default=None, help="GRPO generation length (default 64; --quick: 8)")
    p.add_argument("--workdir", type=Path, default=None, help="fixtures and runs (default: a temporary directory)")
    p.add_argument("--keep-workdir", action="store_true", help="do not delete the work directory at the end")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "padded", "packed", "shared_prefix"],
        help="posttrain's layout (a lever on or off; auto: the fastest the method allows)",
    )
    p.add_argument("--child-timeout", type=int, default=3600, help="seconds per training subprocess")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    sizes = [s.strip().lower() for s in a.sizes.split(",") if s.strip()]
    if a.quick:
        sizes = ["5m"]
    if sorted(set(sizes) - {"5m", "42m"}):
        p.error(f"unknown sizes in {a.sizes!r}; choose from 5m,42m")
    ref_modes = [m.strip() for m in (a.ref_modes or "cold,warm").split(",") if m.strip()]
    if sorted(set(ref_modes) - {"cold", "warm", "copy"}) or not ref_modes:
        p.error("--ref-modes: a non-empty subset of cold,warm,copy")
    if "warm" in ref_modes and "cold" not in ref_modes:
        p.error("--ref-modes: warm needs cold first (the cold run fills the cache)")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    threads = a.threads or (int(env_threads) if a.quick and env_threads and env_threads.isdigit() else 2)
    q = a.quick
    settings = Settings(
        methods=methods,
        sizes=sizes,
        steps=a.steps or (2 if q else 20),
        warmup=a.warmup if a.warmup is not None else (1 if q else 2),
        batch_size=a.batch_size,
        kto_batch_size=a.kto_batch_size or 2 * a.batch_size,
        max_length=128 if q else 512,
        prompt_range=(16, 32) if q else (64, 128),
        completion_range=(16, 48) if q else (64, 256),
        threads=threads,
        lr=1e-6,
        seed=0,
        ref_modes=ref_modes,
        quick_ref_modes=a.quick and a.ref_modes is None,
        grpo={
            "prompts_per_step": a.grpo_prompts or (2 if q else 8),
            "num_generations": a.grpo_generations or (2 if q else 4),
            "max_new_tokens": a.grpo_new_tokens or (8 if q else 64),
            "beta": 0.04,
        },
        peak_seconds=1.0 if q else 5.0,
        peak_n=1024 if q else 2048,
        child_timeout=a.child_timeout,
        quick=q,
        layout=a.layout,
    )
    if settings.prompt_range[1] + settings.completion_range[1] > settings.max_length:
        p.error("prompt + completion lengths exceed max_length")
    return settings, a


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
    files = bf.build_data(
        tokenizer, work / "data", n_pairs=s.batch_size * total_steps,
        n_prompts=s.grpo["prompts_per_step"] * total_steps, prompt_range=s.prompt_range,
        completion_range=s.completion_range, seed=s.seed,
    )  # fmt: skip
    # KTO: batch-size pairs give 2 x batch-size unpaired rows; with the default kto batch the run is one epoch.
    ids = bf.posttrain_token_ids(tokenizer, files, s.max_length, seed=s.seed)
    lengths = bf.check_lengths(ids, s.prompt_range, s.completion_range)
    ids_file = work / "data" / "posttrain_ids.json"
    ids_file.write_text(json.dumps(ids))
    return {"models": models, "files": files, "ids_file": str(ids_file), "lengths": lengths,
            "vocab_size": len(tokenizer), "build_s": time.perf_counter() - t0}  # fmt: skip


def settle_load(limit: float = 0.5, wait_s: float = 120.0) -> float:
    """The 1-minute load average once it is below ``limit`` (it decays for a minute or two after earlier
    work), waiting at most ``wait_s`` seconds: the load the runs start under."""
    deadline = time.perf_counter() + wait_s
    while os.getloadavg()[0] > limit and time.perf_counter() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def measure_peak(threads: int, seconds: float, n: int) -> dict[str, float]:
    """fp32 matmul peak (FLOP/s) on ``threads`` threads: the best of repeated n x n torch.matmul bursts."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best, deadline, bursts = 0.0, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or bursts < 3:
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b, out=c)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
        bursts += 1
    return {"flops": best, "n": n, "threads": threads, "seconds": seconds}


# ---- runs


@dataclass
class Case:
    method: str
    size: str
    reference: str  # cold | warm | copy | none | online
    model_key: str
    data_key: str

    @property
    def label(self) -> str:
        return f"{self.method}-{self.size}-{self.reference}"


def plan(s: Settings) -> list[Case]:
    cases = []
    for method in s.methods:
        sizes = [z for z in s.sizes if method == "dpo" or z == "5m"]
        for size in sizes:
            refs = s.ref_modes if method in WITH_REFERENCE else ["online" if method == "grpo" else "none"]
            if s.quick_ref_modes and method in WITH_REFERENCE and method != "dpo":
                refs = refs[:1]
            model_key = "5m-gen" if method == "grpo" else size
            data_key = {"kto": "kto", "grpo": "prompts"}.get(method, "prefs")
            cases += [Case(method, size, ref, model_key, data_key) for ref in refs]
    return cases


def run_child(tool: str, case: Case, s: Settings, fx: dict[str, Any], work: Path) -> dict[str, Any]:
    """One training run in its own process; its peak RSS from wait4's rusage of that very child."""
    run_dir = work / "runs" / f"{case.label}-{tool}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_key = f"{case.method}-{case.size}" if case.reference in ("cold", "warm") else case.label
    spec = {
        "tool": tool, "method": case.method, "size": case.size, "reference": case.reference,
        "model_dir": fx["models"][case.model_key]["dir"], "data_file": fx["files"][case.data_key],
        "ids_file": fx["ids_file"], "run_dir": str(run_dir), "result_file": str(run_dir / "result.json"),
        "threads": s.threads, "warmup": s.warmup, "steps": s.steps,
        "batch_size": s.kto_batch_size if case.method == "kto" else s.batch_size,
        "max_length": s.max_length, "lr": s.lr, "seed": s.seed, "grpo": s.grpo, "layout": s.layout,
        "ref_cache_dir": str(work / "refcache" / cache_key), "hf_cache_dir": str(work / "hfcache" / cache_key),
        # TRL's output_dir is part of the datasets fingerprint of its prepared data (its map/filter closures hold
        # the config), and so of its reference cache key: the cold and warm runs must share it.
        "trl_output_dir": str(work / "trl-out" / cache_key),
    }  # fmt: skip
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads), "TOKENIZERS_PARALLELISM": "false",
        "POSTTRAIN_CACHE": str(work / "posttrain-cache"), "HF_DATASETS_CACHE": str(work / "hfcache" / cache_key),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TQDM_DISABLE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]),
    })  # fmt: skip
    script = HERE / ("child_posttrain.py" if tool == "posttrain" else "child_trl.py")
    log = run_dir / "log.txt"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(spec_file)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=str(run_dir))  # fmt: skip
        status, usage = None, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > s.child_timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"tool": tool, "wall_s": wall, "returncode": proc.returncode,
                              "peak_rss_kib": usage.ru_maxrss, "log": str(log)}  # fmt: skip
    if proc.returncode == 0 and (run_dir / "result.json").exists():
        result.update(json.loads((run_dir / "result.json").read_text()))
        result["ok"] = True
    else:
        result["ok"] = False
        result["error"] = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    return result


# ---- figures


def figures(r: dict[str, Any], case: Case, s: Settings, n_params: int, peak: float) -> dict[str, Any]:
    """Throughput, tokens/s, MFU of the timed steps; a precomputation amortised over the run's steps."""
    if not r.get("ok"):
        return {}
    w, t = s.warmup, s.steps
    time_s = sum(r["step_times"][w:])
    trained = sum(r["trained_tokens"][w:])
    computed = sum(r.get("computed_trained_tokens", r["trained_tokens"])[w:])  # a shared prompt counts once
    nograd = float(sum(r["nograd_tokens"][w:]))
    share = t / (w + t)  # the timed steps' share of the run: of its precomputation, time and work alike
    amortised_s = r.get("precompute_s", 0.0) * share if case.reference in ("cold", "warm") else 0.0
    nograd += r.get("precompute_tokens", 0) * share if case.reference in ("cold", "warm") else 0.0
    total_s = time_s + amortised_s
    flops = 6 * n_params * computed + 2 * n_params * nograd
    out = {
        "timed_steps_s": time_s,
        "amortised_precompute_s": amortised_s,
        "samples_per_s": r["samples_per_step"] * t / total_s,
        "tokens_per_s": trained / total_s,
        "mfu": flops / total_s / peak,
        "median_step_s": statistics.median(r["step_times"][w:]),
        "peak_rss_gib": r["peak_rss_kib"] / 2**20,
        "step1_loss": r["losses"][0],
        "step1_grad_norm": r["grad_norms"][0],
    }
    if r.get("step_intervals"):  # TRL: end-to-end step intervals (batch assembly included), timed steps only
        intervals = r["step_intervals"][w - 1 :] if w >= 1 else r["step_intervals"]
        with_loading = sum(intervals) + amortised_s
        out["samples_per_s_with_data_loading"] = r["samples_per_step"] * len(intervals) / with_loading
    if r.get("completion_lengths"):
        out["mean_completion_length"] = statistics.fmean(x for x in r["completion_lengths"] if x is not None)
    return out


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("posttrain", "trl", "transformers", "torch", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    s, a = parse_args(argv)
    sys.path.insert(0, str(HERE))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {work}", flush=True)
    started = time.perf_counter()
    try:
        fx = build_fixtures(s, work)
        sizes_text = ", ".join(
            f"{k} ({v['total'] / 1e6:.1f}M, N={v['non_embedding'] / 1e6:.2f}M)" for k, v in fx["models"].items()
        )
        print(f"fixtures: vocab {fx['vocab_size']}, models {sizes_text}, prompt tokens "
              f"{fx['lengths']['prompt_tokens']}, completion tokens {fx['lengths']['completion_tokens']} "
              f"({fx['build_s']:.0f} s)", flush=True)  # fmt: skip
        load_before = settle_load()
        peak = measure_peak(s.threads, s.peak_seconds, s.peak_n)
        print(f"fp32 matmul peak on {s.threads} threads: {peak['flops'] / 1e9:.1f} GFLOP/s "
              f"(load average {load_before:.2f})", flush=True)  # fmt: skip
        rows = []
        for case in plan(s):
            row: dict[str, Any] = {"method": case.method, "size": case.size, "reference": case.reference,
                                   "model_key": case.model_key, "raw": {}, "figures": {}}  # fmt: skip
            n_params = fx["models"][case.model_key]["non_embedding"]
            for tool in TOOLS:
                print(f"[{time.perf_counter() - started:6.0f} s] {case.label}: {tool} ...", end=" ", flush=True)
                r = run_child(tool, case, s, fx, work)
                row["raw"][tool] = r
                row["figures"][tool] = figures(r, case, s, n_params, peak["flops"])
                f = row["figures"][tool]
                if r["ok"]:
                    print(f"{f['samples_per_s']:.2f} samples/s, {f['tokens_per_s']:.0f} tokens/s, "
                          f"step-1 loss {f['step1_loss']}, {r['wall_s']:.0f} s", flush=True)  # fmt: skip
                else:
                    print(f"FAILED (exit {r['returncode']}; log: {r['log']})", flush=True)
            rows.append(row)
        # The peak again after the runs (the larger of the two is used: contention only lowers it), and every
        # row's MFU recomputed against it.
        peak_after = measure_peak(s.threads, s.peak_seconds, s.peak_n)
        peak = {**peak, "flops_before": peak["flops"], "flops_after": peak_after["flops"],
                "flops": max(peak["flops"], peak_after["flops"])}  # fmt: skip
        for row in rows:
            case = Case(row["method"], row["size"], row["reference"], row["model_key"], "")
            n_params = fx["models"][case.model_key]["non_embedding"]
            row["figures"] = {tool: figures(r, case, s, n_params, peak["flops"]) for tool, r in row["raw"].items()}
        notes = []
        # Only the load before the runs says whether others used the machine: afterwards it is the runs' own.
        if load_before > 0.5:
            notes.append(
                f"The machine was not idle (1-minute load average {load_before:.2f} before the runs): other "
                "processes shared the CPU, so these timings and the measured peak (hence MFU) are not reliable."
            )
        if "42m" in s.sizes and s.methods != ["dpo"]:
            notes.append(
                "The 42M model runs DPO only; the other methods run on the 5M model"
                + ("." if "5m" in s.sizes else " (not requested here, so they did not run).")
            )
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "load_average_before": load_before,
            "versions": versions(),
            "settings": asdict(s),
            "peak": peak,
            "fixtures": {k: v for k, v in fx.items() if k != "files"},
            "rows": rows,
            "notes": notes,
            "total_s": time.perf_counter() - started,
        }
        text = markdown(report)
        print()
        print(text)
        a.out.mkdir(parents=True, exist_ok=True)
        stem = datetime.date.today().isoformat() + ("-quick" if s.quick else "")
        stem += "" if s.layout == "auto" else f"-layout-{s.layout}"
        (a.out / f"{stem}.md").write_text(text)
        (a.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {a.out / (stem + '.md')} and {a.out / (stem + '.json')} ({report['total_s']:.0f} s in all)")
        return 0 if all(r.get("ok") for row in rows for r in row["raw"].values()) else 1
    finally:
        if a.workdir is None and not a.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
