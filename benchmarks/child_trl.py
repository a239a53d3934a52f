"""One TRL 1.16 run of the benchmark, in its own process: ``python3 child_trl.py SPEC.json``.

The only place (with nothing else in benchmarks/) that imports TRL. Each step is timed by a TrainerCallback
(``time.perf_counter()`` at ``on_step_begin`` and ``on_step_end``); the time from one ``on_step_end`` to the
next, which adds the data loader's batch assembly and the trainer's logging, is recorded too. Token counts
per step are read from the batches the trainer hands to ``training_step`` (their attention masks), or for
GRPO from the trainer's own ``num_tokens`` log. The reference precomputation (``precompute_ref_log_probs``)
is timed around the trainer's ``hash_module`` call and ``_precompute_ref_logps``, which together fingerprint
the model, compute the log-probs or load them from the datasets cache.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import datasets
    import transformers
    import trl
    from device_clock import gpu_figures, step_clock
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    datasets.disable_progress_bars()
    method = spec["method"]
    total = spec["warmup"] + spec["steps"]
    common: dict[str, Any] = dict(
        output_dir=spec["trl_output_dir"],
        max_steps=total,
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # the transformers default; posttrain's AdamW is fused too
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=spec.get("precision") == "bf16",  # --gpu: bf16 autocast over the fp32 weights, as posttrain
        fp16=False,
        activation_checkpointing=False,  # TRL defaults to gradient checkpointing ON; posttrain's default is off
        gradient_checkpointing=False,  # (the deprecated alias that TRL's configs default to True)
        use_cpu=spec.get("device", "cpu") == "cpu",
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    precompute = spec["reference"] in ("cold", "warm")
    reward_funcs = None
    if method in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        trainer_class: Any = DPOTrainer
        args: Any = DPOConfig(
            **common, beta=0.1, loss_type=["sigmoid" if method == "dpo" else "ipo"], max_length=spec["max_length"],
            precompute_ref_log_probs=precompute, precompute_ref_batch_size=spec["batch_size"], padding_free=False,
        )  # fmt: skip
    elif method == "kto":
        from trl import KTOConfig, KTOTrainer

        trainer_class = KTOTrainer
        args = KTOConfig(
            **common, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, max_length=spec["max_length"],
            precompute_ref_log_probs=precompute, precompute_ref_batch_size=spec["batch_size"],
        )  # fmt: skip
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_class = ORPOTrainer
        args = ORPOConfig(**common, beta=0.1, max_length=spec["max_length"], remove_unused_columns=False)
    elif method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        trainer_class = CPOTrainer
        args = CPOConfig(
            **common,
            loss_type="simpo",
            cpo_alpha=0.0,
            beta=2.0,
            simpo_gamma=1.0,
            max_length=spec["max_length"],
            remove_unused_columns=False,
        )
    elif method == "grpo":
        from bench_rewards import vowel_share
        from trl import GRPOConfig, GRPOTrainer

        g = spec["grpo"]
        trainer_class = GRPOTrainer
        common["per_device_train_batch_size"] = g["prompts_per_step"] * g["num_generations"]
        args = GRPOConfig(
            **common, num_generations=g["num_generations"], max_completion_length=g["max_new_tokens"],
            beta=g["beta"], loss_type="grpo", scale_rewards="group", num_iterations=1, epsilon=0.2,
            temperature=1.0, top_p=1.0, top_k=0, mask_truncated_completions=False, use_vllm=False,
        )  # fmt: skip
        reward_funcs = [vowel_share]
    else:
        raise ValueError(f"unknown method {method!r}")

    # The reference precomputation, timed where TRL does it (inside the trainer's __init__).
    pre_times: list[float] = []

    def timing(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                pre_times.append(time.perf_counter() - start)

        return wrapper

    ref_batches: list[int] = []  # reference batches scored during the precomputation (0: the cache was reused)
    if precompute:
        original_ref = trainer_class.compute_ref_log_probs

        def counting_ref(self: Any, *a: Any, **k: Any) -> Any:
            ref_batches.append(1)
            return original_ref(self, *a, **k)

        trainer_class.compute_ref_log_probs = counting_ref
        module = sys.modules[trainer_class.__module__]
        module.hash_module = timing(module.hash_module)  # type: ignore[attr-defined]
        trainer_class._precompute_ref_logps = timing(trainer_class._precompute_ref_logps)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.begin: float | None = None
            self.times: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            assert self.begin is not None
            self.times.append(now - self.begin)
            self.ends.append(now)

    timer = StepTimer()
    dataset = datasets.load_dataset("json", data_files=spec["data_file"], split="train", cache_dir=spec["hf_cache_dir"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if reward_funcs is not None:
        kwargs["reward_funcs"] = reward_funcs
    setup_start = time.perf_counter()
    trainer = trainer_class(**kwargs, callbacks=[timer])
    setup_s = time.perf_counter() - setup_start
    precompute_batches = len(ref_batches)

    trained: list[int] = []
    nograd: list[int] = []
    original_step = trainer.training_step

    def counting_step(model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
        if isinstance(inputs, dict):

            def masked(key: str) -> int:
                value = inputs.get(key)
                return int(value.sum()) if isinstance(value, torch.Tensor) else 0

            tokens = sum(masked(key) for key in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask"))
            trained.append(tokens)
            kl_rows = masked("KL_attention_mask")  # KTO: the policy's no-grad pass on the mismatched pairs
            ref_rows = tokens + kl_rows if not precompute and method in ("dpo", "ipo", "kto") else 0
            nograd.append(kl_rows + ref_rows)
        return original_step(model, inputs, *a, **k)

    trainer.training_step = counting_step  # type: ignore[method-assign]

    parity, precompute_tokens = token_parity(method, trainer.train_dataset, spec)
    ends = step_clock() if spec.get("gpu") else []
    start = time.perf_counter()
    trainer.train()
    train_call_s = time.perf_counter() - start

    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    logs = sorted({h["step"]: h for h in logs}.values(), key=lambda h: h["step"])
    completion_lengths = None
    if method == "grpo":
        seen = [float(h["num_tokens"]) for h in logs]
        trained = [round(b - a) for a, b in zip([0.0, *seen[:-1]], seen, strict=True)]
        nograd = [2 * t if spec["grpo"]["beta"] > 0 else t for t in trained]  # generation (+ the reference)
        completion_lengths = [h.get("completions/mean_length") for h in logs]
    samples = spec["batch_size"]
    if method == "grpo":
        samples = spec["grpo"]["prompts_per_step"] * spec["grpo"]["num_generations"]
    intervals = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    out = {
        "tool": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "step_times": timer.times,
        "step_intervals": intervals,  # on_step_end to on_step_end: adds batch assembly and logging (from step 2)
        "losses": [h.get("loss") for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "trained_tokens": trained,
        "nograd_tokens": nograd,
        "samples_per_step": samples,
        "precompute_s": sum(pre_times),
        "precompute_tokens": precompute_tokens if precompute_batches else 0,
        "reference_cache_reused": precompute and not precompute_batches,
        "activation_checkpointing": bool(getattr(trainer.args, "activation_checkpointing", False)),
        "setup_s": setup_s,
        "train_call_s": train_call_s,
        "completion_lengths": completion_lengths,
        "token_parity": parity,
        "pid": os.getpid(),
    }
    if spec.get("gpu"):  # step times on the synchronised clock (already end-to-end intervals), peak device memory
        out.update(gpu_figures(spec, ends, start, out["step_times"]), step_intervals=[])
    if len(out["step_times"]) != total or len(trained) != total:
        raise RuntimeError(f"expected {total} steps, got {len(out['step_times'])} timings and {len(trained)} counts")
    Path(spec["result_file"]).write_text(json.dumps(out, indent=1))


def token_parity(method: str, dataset: Any, spec: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Compare the token ids TRL prepared with posttrain's (computed by the driver), and count the tokens a
    reference precomputation scores. GRPO tokenizes prompts on the fly: its check is made on the totals."""
    ids = json.loads(Path(spec["ids_file"]).read_text())
    if method == "grpo":
        return {"checked": "totals only (TRL tokenizes prompts during the run)"}, 0
    columns = set(dataset.column_names)
    rows: list[tuple[list[int], list[int], list[int]]] = []
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:  # DPOTrainer
        rows = list(zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True))
        expected = [tuple(r) for r in ids["prefs"]]
    elif {"prompt_ids", "completion_ids"} <= columns:  # KTOTrainer: its KL pairs are in-batch, not compared
        rows = [(p, c, []) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"], strict=True)]
        expected = [(p, c, []) for p, c, _ in ids["kto"]]
    elif {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"} <= columns:  # ORPO / CPO (legacy)
        for p, c, r in zip(dataset["prompt_input_ids"], dataset["chosen_input_ids"], dataset["rejected_input_ids"],
                           strict=True):  # fmt: skip
            rows.append((list(p), list(c)[len(p) :], list(r)[len(p) :]))
        expected = [tuple(r) for r in ids["prefs"]]
    else:
        return {"checked": f"unknown columns {sorted(columns)}"}, 0
    same = sum(tuple(map(list, a)) == tuple(map(list, b)) for a, b in zip(rows, expected, strict=False))
    parity = {"rows": len(rows), "expected_rows": len(expected), "identical_rows": same}
    if method == "kto" and "KL_completion_ids" in columns:
        kl = dataset["KL_completion_ids"]
        tokens = sum(2 * len(p) + len(c) + len(k) for (p, c, _), k in zip(rows, kl, strict=True))
    else:
        tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in rows)
    return parity, tokens


if __name__ == "__main__":
    main(sys.argv[1])
