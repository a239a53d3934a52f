"""The benchmark's settings from its command line: ``Settings``, ``parse_args`` (the CPU benchmark) and
``gpu_settings`` (``--gpu``), and ``resolve_device``, which completes the ``--gpu`` settings once the device is
known. The options are those of ``python3 benchmarks/run.py --help``; levers.py builds its settings here too.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METHODS = ("dpo", "ipo", "kto", "orpo", "simpo", "grpo")
GPU_METHODS = ("dpo", "kto", "simpo", "orpo", "grpo")  # --gpu's default set (issue 15)
SIZES = ("5m", "42m", "300m")  # bench_fixtures.SIZES; the CPU benchmark runs 5m and 42m


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


def parse_args(argv: list[str] | None = None, description: str | None = None) -> tuple[Settings, argparse.Namespace]:
    """The settings of ``argv`` and the parsed options; ``description`` heads ``--help`` (run.py's docstring)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def resolve_device(s: Settings) -> None:
    """--gpu: CUDA when there is a device (this process only asks; it never creates a CUDA context), else a
    --quick smoke run on the CPU; the peak's matrix size follows."""
    import torch

    s.device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.device == "cpu" and not s.quick:
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False); --gpu --quick runs a "
                         "smoke run of the same code on the CPU")  # fmt: skip
    s.peak_n = (4096 if s.quick else 8192) if s.device == "cuda" else 512
