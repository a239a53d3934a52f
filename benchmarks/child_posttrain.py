"""One posttrain run of the benchmark, in its own process: ``python3 child_posttrain.py SPEC.json``.

Trains through ``posttrain.train`` (the same entry point as ``posttrain train``) and writes RESULT.json with the
per-step figures read back from the run's ``metrics.jsonl`` (``step_time_s``: wall clock from the start of the
step, batch assembly included, to after the optimizer step), the token counts of each step (from posttrain's
own data order, :func:`posttrain.training.offline.batch_indices`, and the token ids the driver computed with
posttrain's tokenization), and the wall time of the reference precomputation (``reference.kind: cached``),
measured around :meth:`OfflineTask.cached_reference_tables`, the one place that computes or loads the cache.

This process never imports TRL.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def run_keys(spec: dict[str, Any]) -> dict[str, Any]:
    """The keys every benchmark run shares: model, data, step count, a constant lr, the precision (fp32; bf16
    autocast over fp32 weights with --gpu), the seed."""
    return {
        "model": spec["model_dir"],
        "output_dir": str(Path(spec["run_dir"]) / "out"),
        "data": {"train": spec["data_file"], "max_length": spec["max_length"]},
        "max_steps": spec["warmup"] + spec["steps"],
        "learning_rate": spec["lr"],
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "max_grad_norm": 1.0,
        "precision": spec.get("precision", "fp32"),
        "seed": spec["seed"],
        "layout": spec.get("layout", "auto"),
    }


def offline_config(spec: dict[str, Any]) -> dict[str, Any]:
    method = spec["method"]
    config: dict[str, Any] = {
        "method": method,
        **run_keys(spec),
        "batch_size": spec["batch_size"],
        "weight_decay": 0.0,
        "logging_steps": 1,
    }
    if method in ("dpo", "ipo", "kto"):
        kind = "copy" if spec["reference"] == "copy" else "cached"
        config["reference"] = {"kind": kind, "cache_dir": spec["ref_cache_dir"]}
        config["beta"] = 0.1
    if method == "ipo":
        config["length_normalize"] = True  # TRL's IPO divides the log-ratios by the completion lengths
    if method == "simpo":
        config.update(beta=2.0, gamma=1.0)
    if method == "orpo":
        config["orpo_lambda"] = 0.1
    return config


def grpo_config(spec: dict[str, Any]) -> dict[str, Any]:
    g = spec["grpo"]
    return {
        "method": "grpo",
        **run_keys(spec),
        "batch_size": g["prompts_per_step"],
        "num_generations": g["num_generations"],
        "beta": g["beta"],
        "loss_aggregation": "grpo",
        "scale_rewards": "std",
        # One generate call for the whole rollout, as TRL's GRPOTrainer makes.
        "generation": {
            "max_new_tokens": g["max_new_tokens"],
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "batch_size": g["prompts_per_step"] * g["num_generations"],
        },
        "rewards": [{"name": "bench_rewards:vowel_share"}],
    }


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_rewards for the GRPO reward
    from device_clock import gpu_figures, step_clock

    import posttrain
    from posttrain.training import task as task_module
    from posttrain.training.metrics import read_metrics
    from posttrain.training.offline import batch_indices

    precompute: list[float] = []
    original = task_module.OfflineTask.cached_reference_tables

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            precompute.append(time.perf_counter() - start)

    task_module.OfflineTask.cached_reference_tables = timed  # type: ignore[method-assign]

    method = spec["method"]
    config = grpo_config(spec) if method == "grpo" else offline_config(spec)
    cache_dir = Path(spec["ref_cache_dir"])
    cached_before = sorted(p.name for p in cache_dir.glob("*.safetensors")) if cache_dir.exists() else []
    ends = step_clock() if spec.get("gpu") else []
    start = time.perf_counter()
    result = posttrain.train(config)
    train_call_s = time.perf_counter() - start
    lines = [r for r in read_metrics(result.metrics_path) if r.get("split") == "train"]
    total = spec["warmup"] + spec["steps"]
    if len(lines) != total:
        raise RuntimeError(f"expected {total} train lines in metrics.jsonl, got {len(lines)}")

    ids = json.loads(Path(spec["ids_file"]).read_text())
    seed = spec["seed"]
    trained: list[int] = []
    nograd: list[int] = []
    logged_tokens: list[int] = []
    computed_trained: list[int] = []  # tokens the forwards computed, where they differ from `trained`
    precompute_tokens = 0
    if method == "grpo":
        g = spec["grpo"]
        n, per = g["num_generations"], g["prompts_per_step"]
        prompts = ids["prompts"]
        samples = per * n
        shared = result.summary.get("layout") == "shared_prefix"  # each group's prompt scored once
        for step, line in enumerate(lines):
            lengths = [len(prompts[i]) for i in batch_indices(step, len(prompts), per, seed)]
            completions = round(line["completion_length"] * samples)
            tokens = n * sum(lengths) + completions
            trained.append(tokens)
            # shared: a group is its prompt, then each completion after one repeated prompt token but the first
            computed_trained.append(sum(lengths) + completions + (n - 1) * per if shared else tokens)
            # generation (each sample's prompt prefilled on its own row) + the reference forward
            nograd.append(tokens + (computed_trained[-1] if g["beta"] > 0 else 0))
    elif method == "kto":
        records = ids["kto"]
        samples = spec["batch_size"]
        for step, line in enumerate(lines):
            batch = [records[i] for i in batch_indices(step, len(records), samples, seed)]
            trained.append(sum(len(p) + len(c) for p, c, _ in batch))
            kl_rows = sum(len(p) + len(k) for p, _, k in batch)  # the policy's no-grad KL-baseline pass
            ref_rows = trained[-1] + kl_rows if spec["reference"] == "copy" else 0
            nograd.append(kl_rows + ref_rows)
            logged_tokens.append(round(line["tokens_per_s"] * line["step_time_s"]))
        precompute_tokens = sum(len(p) + len(c) + len(p) + len(k) for p, c, k in records)
    else:
        pairs = ids["prefs"]
        samples = spec["batch_size"]
        # A shared-prefix layout computes each prompt once, plus one repeated token: what MFU counts.
        shared = result.summary.get("layout") == "shared_prefix"

        def computed(p: list[int], c: list[int], r: list[int]) -> int:
            return len(p) + len(c) + 1 + len(r) if shared else 2 * len(p) + len(c) + len(r)

        for step, line in enumerate(lines):
            batch = [pairs[i] for i in batch_indices(step, len(pairs), samples, seed)]
            trained.append(sum(2 * len(p) + len(c) + len(r) for p, c, r in batch))
            computed_trained.append(sum(computed(*pair) for pair in batch))
            nograd.append(computed_trained[-1] if spec["reference"] == "copy" and method in ("dpo", "ipo") else 0)
            logged_tokens.append(round(line["tokens_per_s"] * line["step_time_s"]))
        if method in ("dpo", "ipo"):
            precompute_tokens = sum(computed(*pair) for pair in pairs)
    if logged_tokens and logged_tokens != (computed_trained or trained):
        raise RuntimeError(f"posttrain's logged tokens {logged_tokens} differ from the expected {trained}")

    out = {
        "tool": "posttrain",
        "step_times": [float(r["step_time_s"]) for r in lines],
        "losses": [r.get("loss") for r in lines],
        "grad_norms": [r.get("grad_norm") for r in lines],
        "trained_tokens": trained,
        "computed_trained_tokens": computed_trained or trained,
        "nograd_tokens": nograd,
        "layout": result.summary.get("layout"),
        "samples_per_step": samples,
        "precompute_s": sum(precompute),
        "precompute_tokens": precompute_tokens if precompute and not cached_before else 0,
        "reference_cache_reused": bool(cached_before),
        "train_call_s": train_call_s,
        "completion_lengths": [r["completion_length"] for r in lines] if method == "grpo" else None,
        "token_parity": None,  # posttrain is the reference of the parity check
        "pid": os.getpid(),
    }
    if spec.get("gpu"):  # step times on the synchronised clock, peak device memory
        out.update(gpu_figures(spec, ends, start, out["step_times"]))
    Path(spec["result_file"]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
