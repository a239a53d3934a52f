"""Two CPU processes (torchrun, gloo) train what one process trains.

One torchrun launch of two processes (this file is also the worker script, see ``worker``) runs every
scenario in turn, so the processes start once; each test then compares a scenario with the same config run
in this (single) process:

* the gradient of the first optimizer step, every tensor, within ``rtol = 1e-5`` plus ``atol = 1e-6`` x the
  tensor's largest entry (fp32 summation order; a gradient averaged instead of summed over the ranks, or a
  rank training the whole batch, is off by a factor of 2),
* the logged figures of every step (loss, grad_norm, the method's metrics) within ``rel = 1e-5`` or
  ``abs = 1e-7`` at step 1 (equal weights), ``abs = 1e-5`` later (a figure such as DPO's policy margin, 1e-2
  after two steps, is a difference of fp32 log-prob sums near -60, whose ulp is 1.9e-6),
* the weights after the last step within ``atol = 1e-6`` (one step moves weights by about lr = 3e-3). The
  runs use ``adam_eps: 1e-3``: Adam's update ``lr * m / (sqrt(v) + eps)`` has slope ``lr / eps`` in the
  gradient, so a gradient entry that is only summation noise (a near-cancellation, 1e-9) moves its weight
  by at most ``3e-9`` instead of up to ``lr`` in either direction, as with the default 1e-8,

for DPO, SFT, KTO, reward models, GRPO, DAPO, RLOO, PPO and iterative DPO under ``ddp`` (scripted sampling:
shards of the prompts draw what one process draws for all of them), DPO, SFT, KTO, reward models, SimPO,
ORPO, GRPO, DAPO, RLOO and PPO (with a minibatch that leaves one process without a row) under ``fsdp2``,
LoRA under both, and QLoRA (a 4-bit base, bitsandbytes on CPU) for DPO and GRPO under ``ddp``. The offline
fsdp2 runs evaluate between and after their steps (DPO, KTO and reward models on a split of 29 examples:
every example counts, as with one process). With the transformers
sampler, two fsdp2 processes draw and train what two ddp processes do. Checkpoints saved by two processes
resume on one and the other way round (ddp and fsdp2, offline and online), and equal an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
CANDIDATES = ["yes", "no", "maybe"]


# ------------------------------------------------------------------------------------- the worker side


def grads_recorder(path: Path) -> Callable[..., float]:
    """A stand-in for ``distributed.clip_grad_norm`` that saves the first call's (reduced, full) gradients
    to ``path`` (first process), then clips as the real one does."""
    from torch.distributed.tensor import DTensor

    from posttrain import distributed

    real = distributed.clip_grad_norm
    done = []

    def clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
        if not done:
            done.append(True)
            grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
            if distributed.is_main():
                torch.save([None if g is None else g.detach().cpu().clone() for g in grads], path)
        return real(params, max_norm)

    return clip


def run_scenario(job: dict[str, Any]) -> int:
    """One scenario in this process: offline methods through the command line (``posttrain train``), online
    ones through ``run_online`` with the scripted generator. Returns the exit status."""
    import yaml

    from posttrain import distributed
    from posttrain.cli import main
    from posttrain.config import load
    from posttrain.rollout.generate import ScriptedGenerator
    from posttrain.training.iterative import run_iterative
    from posttrain.training.online import run_online

    real, real_reduce = distributed.clip_grad_norm, distributed.reduce_gradients
    if job.get("grads"):
        distributed.clip_grad_norm = grads_recorder(Path(job["grads"]))  # type: ignore[assignment]
    if job.get("sigterm_rank") == distributed.rank():  # SIGTERM to this process alone, in its first step

        def reduce_then_signal(params: Any) -> None:
            import signal

            distributed.reduce_gradients = real_reduce  # type: ignore[assignment]
            os.kill(os.getpid(), signal.SIGTERM)
            real_reduce(params)

        distributed.reduce_gradients = reduce_then_signal  # type: ignore[assignment]
    try:
        factory = lambda m, t: ScriptedGenerator(t, CANDIDATES, score_model=m)  # noqa: E731
        if job["kind"] in ("online", "online_hf"):
            scripted = factory if job["kind"] == "online" else None
            run_online(load(job["config"]), resume=job.get("resume", False), generator_factory=scripted)
            return 0
        if job["kind"] == "iterative":
            run_iterative(load(job["config"]), generator_factory=factory)
            return 0
        path = Path(job["config"]["output_dir"] + ".yaml")
        if distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(job["config"]))
        distributed.barrier()
        return main(["train", str(path), *(["--resume"] if job.get("resume") else [])])
    finally:
        distributed.clip_grad_norm = real  # type: ignore[assignment]
        distributed.reduce_gradients = real_reduce  # type: ignore[assignment]


def worker(jobs_file: str) -> None:
    """Entry point of each torchrun process: every scenario of ``jobs_file``; exit statuses to ``.out``."""
    import torch.distributed as dist

    from posttrain import distributed

    distributed.setup()
    jobs = json.loads(Path(jobs_file).read_text())
    statuses = {job["name"]: run_scenario(job) for job in jobs}
    if dist.get_rank() == 0:
        Path(jobs_file + ".out").write_text(json.dumps(statuses))


# ------------------------------------------------------------------------------------- the test side


def offline(method: str, model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    from support import run_config

    return run_config(method, model, data, out, **{"max_steps": 2, "micro_batch_size": 2, "adam_eps": 1e-3, **extra})


def online(method: str, model: Path, prompts: Path, out: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "method": method, "model": str(model), "output_dir": str(out),
        "data": {"train": str(prompts), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 4, "batch_size": 4, "max_steps": 2, "learning_rate": 3e-3,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "beta": 0.04, "adam_eps": 1e-3,
    }  # fmt: skip
    config.update(extra)
    return config


def truncate(run_dir: Path, step: int) -> None:
    """Leave ``run_dir`` as a run killed right after its step-``step`` checkpoint would have left it."""
    for later in sorted((run_dir / "checkpoints").glob("step-*")):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    shutil.rmtree(run_dir / "model")
    (run_dir / "summary.json").unlink()


def run_here(job: dict[str, Any]) -> None:
    """A scenario in this process (one process: every distributed function is the identity)."""
    assert run_scenario(job) == 0


class Runs:
    """The scenarios: ``single[name]`` ran here, ``double[name]`` under torchrun with two processes."""

    def __init__(self, root: Path, model: Path, pairs: Path, prompts: Path) -> None:
        self.root, self.single, self.double = root, root / "single", root / "double"
        self.jobs: dict[str, dict[str, Any]] = {}
        self.statuses: dict[str, int] = {}  # exit status of each scenario of the two-process launch
        self.log = ""  # its output
        self.double_only: set[str] = set()
        ppo = {"num_generations": 2, "num_mini_batches": 2, "ppo_epochs": 2}
        # Eval splits of 29 examples: shares of 14 and 15, so 7 and 8 micro-batches of 2 (fsdp2: a filler).
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        odd_pairs, odd_unpaired = root / "pairs29.jsonl", root / "unpaired29.jsonl"
        odd_pairs.write_text("".join(json.dumps(r) + "\n" for r in rows[:29]))
        unpaired = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows[:15]]
        unpaired += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows[15:29]]
        odd_unpaired.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
        specs: dict[str, tuple[str, str, Path, dict[str, Any]]] = {
            "dpo": ("cli", "dpo", pairs, {"save_steps": 1}),
            "dpo_cached": ("cli", "dpo", pairs, {"reference": {"kind": "cached", "cache_dir": "CACHE"}}),
            "sft": ("cli", "sft", pairs, {}),
            "kto": ("cli", "kto", pairs, {}),
            "reward": ("cli", "reward", pairs, {}),
            "dpo_lora": ("cli", "dpo", pairs, {"lora": {"r": 4}}),
            "dpo_fsdp2": ("cli", "dpo", pairs, {"save_steps": 1, "distributed": {"strategy": "fsdp2"}}),
            "dpo_lora_fsdp2": ("cli", "dpo", pairs, {"lora": {"r": 4}, "distributed": {"strategy": "fsdp2"}}),
            "dpo_qlora": ("cli", "dpo", pairs, {"lora": QLORA}),
            # (And an evaluation between the steps: no-grad passes, then a training step.)
            "dpo_fsdp2_odd_eval": ("cli", "dpo", pairs, {"eval_file": odd_pairs, "eval_steps": 1, **FSDP2}),
            "kto_fsdp2_odd_eval": ("cli", "kto", pairs, {"eval_file": odd_unpaired, "eval_steps": 1, **FSDP2}),
            "sft_fsdp2": ("cli", "sft", pairs, {"eval_steps": 1, **FSDP2}),
            "reward_fsdp2": ("cli", "reward", pairs, {"eval_file": odd_pairs, "eval_steps": 1, **FSDP2}),
            "simpo_fsdp2": ("cli", "simpo", pairs, {"eval_steps": 1, **FSDP2}),
            "orpo_fsdp2": ("cli", "orpo", pairs, {"eval_steps": 1, **FSDP2}),
            "grpo": ("online", "grpo", prompts, {"num_iterations": 2}),
            "dapo": ("online", "dapo", prompts, {"max_steps": 3}),
            "rloo": ("online", "rloo", prompts, {}),
            "ppo": ("online", "ppo", prompts, ppo),
            "grpo_qlora": ("online", "grpo", prompts, {"num_iterations": 2, "lora": QLORA}),
            "iterative_dpo": ("iterative", "iterative_dpo", prompts, ITERATIVE),
            "grpo_fsdp2": ("online", "grpo", prompts, {"num_iterations": 2, **FSDP2}),
            "dapo_fsdp2": ("online", "dapo", prompts, {"max_steps": 3, **FSDP2}),
            "rloo_fsdp2": ("online", "rloo", prompts, FSDP2),
            # One row per micro-batch, 4 rows in minibatches of 2, 1 and 1: the first process has no row of
            # the last two, and runs a filler forward and backward for each (fsdp2's collectives).
            "ppo_fsdp2": ("online", "ppo", prompts, {**PPO_UNEVEN, "save_steps": 1, **FSDP2}),
            "ppo_lora_fsdp2": ("online", "ppo", prompts, {**PPO_UNEVEN, "lora": {"r": 4}, "save_steps": 1, **FSDP2}),
            # The transformers sampler (not the scripted one): only run by two processes, ddp against fsdp2.
            "grpo_hf": ("online_hf", "grpo", prompts, HF_SAMPLING),
            "grpo_hf_fsdp2": ("online_hf", "grpo", prompts, {**HF_SAMPLING, **FSDP2}),
        }
        for name, (kind, method, data, extra) in specs.items():
            build = offline if kind == "cli" else online
            if kind == "online_hf":
                self.double_only.add(name)
            if kind == "iterative" or name in ("grpo_fsdp2", "grpo_hf", "grpo_hf_fsdp2"):  # (held-out sampling too)
                extra = {**extra, "data": {"train": str(data), "eval": str(data), "max_length": 64}}
            self.jobs[name] = {"name": name, "kind": kind, "method": method,
                               "config": build(method, model, data, Path("OUT"), **extra)}  # fmt: skip

    def job(self, scenario: str, where: Path, **extra: Any) -> dict[str, Any]:
        """Scenario ``scenario`` writing to ``where / scenario``; ``extra`` overrides job keys (``name`` ...)."""
        job = json.loads(json.dumps(self.jobs[scenario]))
        job["config"]["output_dir"] = str(where / scenario)
        if job["config"].get("reference", {}).get("cache_dir") == "CACHE":  # a cold cache for each launch
            job["config"]["reference"]["cache_dir"] = str(where / f"{scenario}.refcache")
        job["grads"] = str(where / f"{scenario}.grads.pt")
        job.update(extra)
        return job


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    from support import first_bundled_pairs, write_word_prompts

    root = tmp_path_factory.mktemp("distributed")
    prompts = root / "prompts.jsonl"
    write_word_prompts(prompts, 16)
    r = Runs(root, tiny_model_dir, first_bundled_pairs(root / "pairs.jsonl"), prompts)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if NCCL and gpus < 2:
        pytest.fail(f"POSTTRAIN_TEST_NCCL=1 needs two CUDA GPUs (one per process); this machine has {gpus}")
    # 1. Every scenario in this process; a second single DPO run of each strategy is cut after step 1 for
    # the two processes to resume (1 -> 2). On the CPU unless NCCL is asked for, like the two processes.
    with pytest.MonkeyPatch.context() as patch:
        if not NCCL:
            patch.setattr(torch.cuda, "is_available", lambda: False)
        for name in r.jobs:
            if name not in r.double_only:
                run_here(r.job(name, r.single))
        for name in RESUMED:
            run_here(r.job(name, r.root / "one-to-two", grads=None))
            truncate(r.root / "one-to-two" / name, 1)
    # 2. One torchrun launch of two processes: every scenario, the 1 -> 2 resumptions, a second DPO run of
    # each strategy for one process to resume (2 -> 1), two refusals.
    jobs = [r.job(name, r.double) for name in r.jobs]
    jobs += [r.job(name, r.root / "one-to-two", name=f"resume_{name}", resume=True, grads=None) for name in RESUMED]
    jobs += [r.job(name, r.root / "two-to-one", name=f"cut_{name}", grads=None) for name in RESUMED]
    bad = r.job("dpo", r.root / "bad", name="odd_batch", grads=None)
    bad["config"]["batch_size"], bad["config"]["micro_batch_size"] = 7, 7
    vllm_fsdp2 = r.job("grpo", r.root / "bad", name="vllm_fsdp2", grads=None, kind="cli")
    vllm_fsdp2["config"]["distributed"] = {"strategy": "fsdp2"}
    vllm_fsdp2["config"]["generation"] = {"backend": "vllm"}
    jobs += [bad, vllm_fsdp2]
    # SIGTERM to the second process only, then --resume (no save_steps: only the stop writes a checkpoint).
    for job in (r.job("dpo", r.root / "stop", name="stop_dpo", grads=None, sigterm_rank=1),
                r.job("dpo", r.root / "stop", name="resume_stop_dpo", grads=None, resume=True)):  # fmt: skip
        del job["config"]["save_steps"]
        jobs.append(job)
    jobs_file = r.root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    # gloo on the CPU (a machine with one GPU could not give each process its own); NCCL on two GPUs when asked.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if NCCL else {"CUDA_VISIBLE_DEVICES": ""})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve()), str(jobs_file)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    r.statuses = json.loads((r.root / "jobs.json.out").read_text())
    r.log = done.stdout + done.stderr
    return r


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    assert files, model_dir
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def train_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    from posttrain.training.metrics import read_metrics

    return {m["step"]: m for m in read_metrics(run_dir / "metrics.jsonl") if m["split"] == "train"}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=name)


def assert_same_run(single: Path, double: Path, skip: tuple[str, ...] = ()) -> None:
    """The same figures at every step (timings aside) and the same final weights."""
    a, b = train_metrics(single), train_metrics(double)
    assert sorted(a) == sorted(b) and a
    for step in a:
        for key, value in a[step].items():
            if key.endswith(("time_s", "_gb")) or key in ("tokens_per_s", *skip) or not isinstance(value, float):
                continue
            # Step 1 starts from equal weights: only the order of sums differs. Later steps start from weights
            # that differ by rounding, and a figure such as policy_margin (a difference of two summed fp32
            # log-probs near -60) moves by an ulp of those sums, 2^-19 ~ 1.9e-6.
            tolerance = 1e-7 if step == 1 else 1e-5
            assert b[step][key] == pytest.approx(value, rel=1e-5, abs=tolerance), (step, key)
    assert_same_weights(single / "model", double / "model")


def assert_same_grads(single: Path, double: Path) -> None:
    ga, gb = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert len(ga) == len(gb) and ga
    assert any(g is not None and bool(g.abs().max() > 0) for g in ga)
    for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
        assert (x is None) == (y is None), i
        if x is not None:
            assert x.shape == y.shape, i
            # Float32 sums in another order (two shards, then one all-reduce): entries where large terms cancel
            # keep an absolute error of a few ulps of the tensor's largest entry (5.6e-6 of it seen on the reward
            # model's embedding, run to run, with the BLAS thread count); a factor-2 error (mean instead of
            # sum, or every rank on the whole batch) is 1e5 times larger.
            torch.testing.assert_close(y, x, rtol=1e-5, atol=2e-5 * float(x.abs().max()), msg=f"tensor {i}")


SCENARIOS = [
    "dpo",
    "dpo_cached",
    "sft",
    "kto",
    "reward",
    "dpo_lora",
    "dpo_fsdp2",
    "dpo_lora_fsdp2",
    "dpo_qlora",
    "dpo_fsdp2_odd_eval",
    "kto_fsdp2_odd_eval",
    "sft_fsdp2",
    "reward_fsdp2",
    "simpo_fsdp2",
    "orpo_fsdp2",
    "grpo",
    "dapo",
    "rloo",
    "ppo",
    "grpo_qlora",
    "grpo_fsdp2",
    "dapo_fsdp2",
    "rloo_fsdp2",
    "ppo_fsdp2",
    "ppo_lora_fsdp2",
]
FSDP2 = {"distributed": {"strategy": "fsdp2"}}
# POSTTRAIN_TEST_NCCL=1 (a machine with two CUDA GPUs): both sides on GPUs, the two processes on NCCL.
NCCL = os.environ.get("POSTTRAIN_TEST_NCCL") == "1"
QLORA = {"r": 4, "load_in_4bit": True}  # (ddp: fsdp2 cannot shard bitsandbytes' 4-bit weights, refused)
PPO_UNEVEN = {"num_generations": 1, "micro_batch_size": 1, "num_mini_batches": 3}
HF_SAMPLING = {"num_iterations": 2, "generation": {"max_new_tokens": 6, "temperature": 1.0}}
ITERATIVE = {"num_generations": 3, "rounds": 2, "steps_per_round": 2, "reference_update": "initial", "beta": 0.1}
RESUMED = ("dpo", "dpo_fsdp2", "ppo_fsdp2")


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_train_what_one_trains(name: str, runs: Runs) -> None:
    assert runs.statuses[name] == 0, runs.log[-6000:]
    assert_same_grads(runs.single / f"{name}.grads.pt", runs.double / f"{name}.grads.pt")
    assert_same_run(runs.single / name, runs.double / name)


def test_two_processes_compute_the_reference_cache_together(runs: Runs) -> None:
    """Each process scores half of the pairs; the gathered table (written once per disk) is the whole one,
    in record order, the table one process computes alone (the same file name: the same fingerprint)."""
    from safetensors.torch import load_file

    one = sorted((runs.single / "dpo_cached.refcache").glob("*.safetensors"))
    two = sorted((runs.double / "dpo_cached.refcache").glob("*.safetensors"))
    assert [p.name for p in one] == [p.name for p in two] and one
    for a, b in zip(one, two, strict=True):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() == {"chosen", "rejected"}
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["ppo", "ppo_fsdp2"])
def test_ppo_critic_is_the_same(name: str, runs: Runs) -> None:
    assert_same_weights(runs.single / name / "critic", runs.double / name / "critic")


@pytest.mark.parametrize("name", ["dpo_fsdp2_odd_eval", "kto_fsdp2_odd_eval"])
def test_fsdp2_evaluates_every_example(name: str, runs: Runs) -> None:
    """An eval split that does not split evenly (29 examples): every example counts under fsdp2 too (the
    process a micro-batch short runs a filler and drops its figures), KTO's KL baseline over it included."""
    summary = [json.loads((where / name / "summary.json").read_text()) for where in (runs.single, runs.double)]
    for key in ("heldout_before", "heldout_after"):
        assert summary[0][key].keys() == summary[1][key].keys()
        for figure, value in summary[0][key].items():
            assert summary[1][key][figure] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, figure)


def test_fsdp2_samples_what_ddp_samples(runs: Runs) -> None:
    """The transformers sampler under fsdp2 (the weights gathered once for all decoding steps, each process
    decoding its share alone) draws what ddp replicas draw, and the run trains alike."""
    for name in ("grpo_hf", "grpo_hf_fsdp2"):
        assert runs.statuses[name] == 0, runs.log[-6000:]
    assert_same_run(runs.double / "grpo_hf", runs.double / "grpo_hf_fsdp2")
    summary = [json.loads((runs.double / name / "summary.json").read_text()) for name in ("grpo_hf", "grpo_hf_fsdp2")]
    for key in ("heldout_before", "heldout_after"):  # greedy answers to the held-out prompts
        assert summary[0][key] == pytest.approx(summary[1][key], rel=1e-6)
    lengths = [m["completion_length"] for m in train_metrics(runs.double / "grpo_hf").values()]
    assert all(0 < x <= 6 for x in lengths)


def test_iterative_dpo_rounds_are_the_same(runs: Runs) -> None:
    """Sampling shards, the pairs written once, each round's offline run split over the processes: the same
    pairs, held-out figures, training figures and final model."""
    assert runs.statuses["iterative_dpo"] == 0, runs.log[-6000:]
    one, two = runs.single / "iterative_dpo", runs.double / "iterative_dpo"
    for r in (1, 2):
        assert (one / f"round-{r}" / "pairs.jsonl").read_text() == (two / f"round-{r}" / "pairs.jsonl").read_text()
        assert_same_run(one / f"round-{r}" / "train", two / f"round-{r}" / "train")
    assert_same_grads(runs.single / "iterative_dpo.grads.pt", runs.double / "iterative_dpo.grads.pt")
    summary = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
    assert summary[0]["rounds"] == summary[1]["rounds"] and summary[0]["heldout_after"] == summary[1]["heldout_after"]
    assert_same_weights(one / "model", two / "model")


@pytest.mark.parametrize("name", RESUMED)
def test_one_process_resumes_two(name: str, runs: Runs) -> None:
    """A checkpoint written by two processes (ddp replicas, or fsdp2 shards gathered) resumes on one: the
    rest of the run equals an uninterrupted single-process run."""
    from posttrain.training import checkpoint

    assert runs.statuses[f"cut_{name}"] == 0, runs.log[-6000:]
    run_dir = runs.root / "two-to-one" / name
    truncate(run_dir, 1)
    state = checkpoint.load_state(run_dir / "checkpoints" / "step-000001")  # safetensors + JSON, no pickle
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])  # torch's own layout, full tensors
    run_here(runs.job(name, runs.root / "two-to-one", resume=True, grads=None))
    assert_same_run(runs.single / name, run_dir)


@pytest.mark.parametrize("name", RESUMED)
def test_two_processes_resume_one(name: str, runs: Runs) -> None:
    """A single-process checkpoint resumes on two processes (fsdp2: the full optimizer state is sharded on
    load) and the run ends where an uninterrupted single-process run ends."""
    assert runs.statuses[f"resume_{name}"] == 0, runs.log[-6000:]
    assert_same_run(runs.single / name, runs.root / "one-to-two" / name)


def test_a_sigterm_to_one_process_stops_both_at_the_same_step(runs: Runs) -> None:
    """The second process alone gets SIGTERM in step 1: the request travels with the step's figures, so the
    first process (whose status this is) stops at the same step, 143, with the checkpoint of step 1 that
    save_steps would not have written; --resume by both ends as one process's uninterrupted run."""
    assert runs.statuses["stop_dpo"] == 143 and runs.statuses["resume_stop_dpo"] == 0
    out = runs.root / "stop" / "dpo"
    assert "posttrain: stopped by SIGTERM after step 1 of 2; checkpoint " in runs.log
    assert f"resumed from {out / 'checkpoints' / 'step-000001'} at step 1" in runs.log
    assert not (out / "checkpoints").exists()  # the stop's checkpoint removed once the run finished
    assert_same_run(runs.single / "dpo", out)


def test_refusals_are_one_line_errors(runs: Runs) -> None:
    """A batch that does not split evenly over the processes, and fsdp2 with the vLLM sampler, stop with exit
    status 2 and a line naming the field, before anything is written."""
    assert runs.statuses["odd_batch"] == 2 and runs.statuses["vllm_fsdp2"] == 2
    assert "posttrain: error: batch_size: 7 is not a multiple of the 2 processes" in runs.log
    assert "posttrain: error: distributed.strategy: fsdp2 with generation.backend: vllm is not supported" in runs.log
    assert not (runs.root / "bad" / "dpo").exists() and not (runs.root / "bad" / "grpo").exists()


# -------------------------------------------------------------------------- single-process unit checks


if __name__ == "__main__":
    worker(sys.argv[1])
