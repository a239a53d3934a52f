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
GPU_METHODS = ("dpo", "kto", "simpo", "orpo", "grpo")  # --gpu's default set (issue 15)
SIZES = ("5m", "42m", "300m")  # bench_fixtures.SIZES; the CPU benchmark runs 5m and 42m
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
    # --gpu: rows at each of batch_sizes (batch_size is the first), bf16 autocast, the peak in bf16 on the GPU.
    gpu: bool = False
    batch_sizes: list[int] = field(default_factory=list)
    precision: str = "fp32"
    device: str = "cpu"  # --gpu: "cuda", or "cpu" for a --quick smoke run on a machine without one
    budget_s: float | None = None  # start no run that would end past this many seconds after the start

    @property
    def batches(self) -> list[int]:
        return self.batch_sizes or [self.batch_size]

    def kto_batch(self, batch: int) -> int:
        """KTO's unpaired examples per step: --kto-batch-size, else both halves of ``batch`` pairs."""
        return self.kto_batch_size or 2 * batch

    def grpo_for(self, batch: int) -> dict[str, Any]:
        """GRPO's settings of a run: with --gpu, ``batch`` prompts per step (each with num_generations samples)."""
        return {**self.grpo, "prompts_per_step": batch} if self.gpu else self.grpo


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 2 timed steps, 5M model, short data")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} (default: all; --gpu: {','.join(GPU_METHODS)})",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="model sizes: 5m (every method), 42m (DPO only); --gpu: 300m (default), 42m, 5m, every method",
    )
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
    p.add_argument("--child-timeout", type=int, default=None, help="seconds per training subprocess (3600; --gpu 900)")
    p.add_argument("--gpu", action="store_true",
                   help="GPU mode: bf16 autocast, the 300M model, dpo,kto,simpo,orpo,grpo at --batch-sizes, a "
                        "bf16 matmul peak; --quick without CUDA: a smoke run of that code on the CPU")  # fmt: skip
    p.add_argument("--batch-sizes", default=None, help="--gpu: the batch sizes of the rows (default 8,32; --quick 2,4)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: start no run that would end after this (the last run's time as the estimate); "
                        "the rows left out are listed in the report")  # fmt: skip
    a = p.parse_args(argv)
    if a.gpu:
        return gpu_settings(p, a), a
    if a.batch_sizes:
        p.error("--batch-sizes needs --gpu (the CPU benchmark has one --batch-size)")
    methods = [m.strip() for m in (a.methods or ",".join(METHODS)).split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    sizes = [s.strip().lower() for s in (a.sizes or "5m,42m").split(",") if s.strip()]
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
        child_timeout=a.child_timeout or 3600,
        quick=q,
        layout=a.layout,
        budget_s=a.budget,
    )
    if settings.prompt_range[1] + settings.completion_range[1] > settings.max_length:
        p.error("prompt + completion lengths exceed max_length")
    return settings, a


def gpu_settings(p: argparse.ArgumentParser, a: argparse.Namespace) -> Settings:
    """--gpu: the issue-15 benchmark (300M Llama, bf16 autocast over fp32 weights, batch 8 and 32, a frozen
    reference copy), or with --quick a seconds-long smoke run of the same code paths (the 5M model, short
    data), on the CPU when there is no CUDA device."""
    q = a.quick
    methods = [m.strip() for m in (a.methods or ",".join(GPU_METHODS)).split(",") if m.strip()]
    if sorted(set(methods) - set(METHODS)):
        p.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {','.join(METHODS)}")
    sizes = [z.strip().lower() for z in ("5m" if q else a.sizes or "300m").split(",") if z.strip()]
    if sorted(set(sizes) - set(SIZES)) or not sizes:
        p.error(f"unknown sizes in {a.sizes!r}; choose from {','.join(SIZES)}")
    try:
        batches = [int(b) for b in (a.batch_sizes or ("2,4" if q else "8,32")).split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes: comma-separated integers, got {a.batch_sizes!r}")
    if not batches or min(batches) < 1:
        p.error("--batch-sizes: positive integers")
    if a.kto_batch_size or a.grpo_prompts:
        p.error("--gpu: KTO runs 2 x each batch size and GRPO batch-size prompts; --kto-batch-size and "
                "--grpo-prompts are for the CPU benchmark")  # fmt: skip
    ref_modes = [m.strip() for m in (a.ref_modes or "copy").split(",") if m.strip()]
    warm_alone = "warm" in ref_modes and "cold" not in ref_modes
    if sorted(set(ref_modes) - {"cold", "warm", "copy"}) or not ref_modes or warm_alone:
        p.error("--ref-modes: a non-empty subset of cold,warm,copy (warm needs cold)")
    warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    if warmup < 1:
        p.error("--gpu needs --warmup >= 1: a run's first step carries its set-up (CUDA context, allocator)")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    quick_threads = int(env_threads) if q and env_threads and env_threads.isdigit() else None
    s = Settings(
        methods=methods,
        sizes=sizes,
        steps=a.steps or (2 if q else 10),
        warmup=warmup,
        batch_size=batches[0],
        kto_batch_size=0,  # 2 x the row's batch
        max_length=128 if q else 512,
        prompt_range=(16, 32) if q else (64, 128),
        completion_range=(16, 48) if q else (64, 256),
        threads=a.threads or quick_threads or min(8, os.cpu_count() or 1),
        lr=1e-6,
        seed=0,
        ref_modes=ref_modes,
        quick_ref_modes=False,
        grpo={
            "prompts_per_step": None,  # the row's batch
            "num_generations": a.grpo_generations or (2 if q else 4),
            "max_new_tokens": a.grpo_new_tokens or (8 if q else 64),
            "beta": 0.04,
        },
        peak_seconds=0.5 if q else 2.0,
        peak_n=0,  # set once the device is known: 8192 on a GPU
        child_timeout=a.child_timeout or 900,
        quick=q,
        layout=a.layout,
        gpu=True,
        batch_sizes=batches,
        precision="bf16",
        budget_s=a.budget,
    )
    if s.prompt_range[1] + s.completion_range[1] > s.max_length:
        p.error("prompt + completion lengths exceed max_length")
    return s


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


def settle_load(limit: float = 0.5, wait_s: float = 120.0) -> float:
    """The 1-minute load average once it is below ``limit`` (it decays for a minute or two after earlier
    work), waiting at most ``wait_s`` seconds: the load the runs start under."""
    deadline = time.perf_counter() + wait_s
    while os.getloadavg()[0] > limit and time.perf_counter() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def measure_peak(threads: int, seconds: float, n: int, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Matmul peak (FLOP/s): the best of repeated bursts of four n x n torch.matmul calls, fp32 on ``threads``
    CPU threads by default; on a GPU the device is synchronised before and after each burst."""
    import torch

    torch.set_num_threads(threads)
    kind = torch.device(device)
    a, b = (torch.randn(n, n, device=kind, dtype=getattr(torch, dtype)) for _ in range(2))
    c = torch.empty_like(a)
    sync = torch.cuda.synchronize if kind.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best, deadline, bursts = 0.0, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or bursts < 3:
        sync()
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b, out=c)
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
        bursts += 1
    out: dict[str, Any] = {"flops": best, "n": n, "threads": threads, "seconds": seconds}
    if device != "cpu" or dtype != "float32":  # the CPU benchmark's JSON keeps its keys
        out.update(device=device, dtype=dtype)
    return out


def peak_in_child(s: Settings, work: Path, tag: str) -> dict[str, Any] | None:
    """--gpu: the bf16 matmul peak measured by child_peak.py in its own process (the training children are
    processes of their own too), with the device's name and memory and torch's CUDA version; None if it failed."""
    out = work / f"peak-{tag}.json"
    spec = {"threads": s.threads, "seconds": s.peak_seconds, "n": s.peak_n, "device": s.device, "dtype": "bfloat16",
            "result_file": str(out)}  # fmt: skip
    log = work / f"peak-{tag}.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "child_peak.py"), json.dumps(spec)], stdout=f,
                              stderr=subprocess.STDOUT, env=child_env(s, {}), timeout=300, check=False)  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        print(f"peak measurement failed (exit {proc.returncode}; log: {log})", flush=True)
        return None
    return json.loads(out.read_text())


# ---- runs


@dataclass
class Case:
    method: str
    size: str
    reference: str  # cold | warm | copy | none | online
    model_key: str
    data_key: str
    batch: int | None = None  # --gpu: the row's batch size; None: Settings.batch_size

    @property
    def label(self) -> str:
        return f"{self.method}-{self.size}-{self.reference}" + (f"-b{self.batch}" if self.batch else "")


def plan(s: Settings) -> list[Case]:
    cases = []
    for method in s.methods:
        sizes = s.sizes if s.gpu else [z for z in s.sizes if method == "dpo" or z == "5m"]
        for size in sizes:
            refs = s.ref_modes if method in WITH_REFERENCE else ["online" if method == "grpo" else "none"]
            if s.quick_ref_modes and method in WITH_REFERENCE and method != "dpo":
                refs = refs[:1]
            model_key = f"{size}-gen" if method == "grpo" else size
            data_key = {"kto": "kto", "grpo": "prompts"}.get(method, "prefs")
            for batch in s.batch_sizes if s.gpu else [None]:
                cases += [Case(method, size, ref, model_key, data_key, batch) for ref in refs]
    return cases


def child_env(s: Settings, extra: dict[str, str]) -> dict[str, str]:
    """A child's environment: its thread count, offline Hugging Face libraries, benchmarks/ and the repository
    on PYTHONPATH."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads), "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TQDM_DISABLE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]), **extra,
    })  # fmt: skip
    return env


def run_child(tool: str, case: Case, s: Settings, fx: dict[str, Any], work: Path) -> dict[str, Any]:
    """One training run in its own process; its peak RSS from wait4's rusage of that very child."""
    run_dir = work / "runs" / f"{case.label}-{tool}"
    run_dir.mkdir(parents=True, exist_ok=True)
    batch = case.batch or s.batch_size
    data = fx["data"][batch]
    cache_key = f"{case.method}-{case.size}" if case.reference in ("cold", "warm") else case.label
    cache_key += f"-b{case.batch}" if case.batch and case.reference in ("cold", "warm") else ""
    spec = {
        "tool": tool, "method": case.method, "size": case.size, "reference": case.reference,
        "model_dir": fx["models"][case.model_key]["dir"], "data_file": data["files"][case.data_key],
        "ids_file": data["ids_file"], "run_dir": str(run_dir), "result_file": str(run_dir / "result.json"),
        "threads": s.threads, "warmup": s.warmup, "steps": s.steps,
        "batch_size": s.kto_batch(batch) if case.method == "kto" else batch,
        "max_length": s.max_length, "lr": s.lr, "seed": s.seed, "grpo": s.grpo_for(batch), "layout": s.layout,
        # --gpu: bf16 autocast, the device, and each optimizer step's end timed with the device synchronised
        "precision": s.precision, "device": s.device, "gpu": s.gpu,
        "ref_cache_dir": str(work / "refcache" / cache_key), "hf_cache_dir": str(work / "hfcache" / cache_key),
        # TRL's output_dir is part of the datasets fingerprint of its prepared data (its map/filter closures hold
        # the config), and so of its reference cache key: the cold and warm runs must share it.
        "trl_output_dir": str(work / "trl-out" / cache_key),
    }  # fmt: skip
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    env = child_env(s, {"POSTTRAIN_CACHE": str(work / "posttrain-cache"),
                        "HF_DATASETS_CACHE": str(work / "hfcache" / cache_key)})  # fmt: skip
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
    if s.gpu:  # posttrain's saved 300M model (1.3 GB a run) is not needed: keep the disk free
        for weights in (run_dir / "out").rglob("*.safetensors"):
            weights.unlink()
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
    for key in ("cuda_peak_allocated", "cuda_peak_reserved"):  # --gpu on a CUDA device: read in the child
        if r.get(key) is not None:
            out[key.replace("cuda_peak", "peak_gpu") + "_gib"] = r[key] / 2**30
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


def resolve_device(s: Settings) -> None:
    """--gpu: CUDA when there is a device (this process only asks; it never creates a CUDA context), else a
    --quick smoke run on the CPU; the peak's matrix size follows."""
    import torch

    s.device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.device == "cpu" and not s.quick:
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False); --gpu --quick runs a "
                         "smoke run of the same code on the CPU")  # fmt: skip
    s.peak_n = (4096 if s.quick else 8192) if s.device == "cuda" else 512


def main(argv: list[str] | None = None) -> int:
    s, a = parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
