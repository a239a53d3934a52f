"""The benchmark's runs: which ones and in what order (``Case``, ``plan``), each run in its own process
(``child_env``, ``run_child``: the spec it gets, its peak RSS from wait4), and what its raw results come to
(``figures``: samples/s, tokens/s, MFU). This module never imports TRL; child_trl.py does.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_settings import Settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WITH_REFERENCE = ("dpo", "ipo", "kto")


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
