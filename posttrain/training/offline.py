"""The offline loop: examples -> records -> batches -> log-probs -> loss -> optimizer step.

Every offline method runs through :func:`run`. What differs between kinds of data (pairs, demonstrations,
unpaired feedback) sits behind :class:`~posttrain.training.task.OfflineTask`; a method only supplies its
loss. Read top to bottom: the numbered steps are the data flow of DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from posttrain import determinism, distributed
from posttrain.algorithms import OnlineAlgorithm
from posttrain.config import ConfigError, TrainConfig, check_models, load
from posttrain.host import host_values
from posttrain.model import compiled, lora
from posttrain.model.load import load_tokenizer, remote_code
from posttrain.model.spans import span_attention
from posttrain.report.card import write_card
from posttrain.tracking import open_trackers
from posttrain.training import checkpoint, disk, memory, rundir, stopping
from posttrain.training.guard import NonFiniteGuard
from posttrain.training.metrics import TOKENS, MetricSums, MetricsWriter
from posttrain.training.optim import build_optimizer, build_scheduler
from posttrain.training.task import OfflineTask
from posttrain.training.tasks import task_for

R = TypeVar("R")


@dataclass
class RunResult:
    """What a finished run produced: where things are and the held-out summary."""

    output_dir: Path
    model_dir: Path
    metrics_path: Path
    steps: int
    summary: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def finished(output_dir: Path) -> bool:
        """Whether ``output_dir`` holds a run that finished: its summary.json and model/ written."""
        return (output_dir / "summary.json").is_file() and (output_dir / "model").is_dir()

    @staticmethod
    def read_back(output_dir: Path) -> RunResult | None:
        """The result of a run that finished, read from its folder; None for a folder that holds none."""
        if not RunResult.finished(output_dir):
            return None
        summary = json.loads((output_dir / "summary.json").read_text())
        steps = int(summary.get("steps", 0))
        return RunResult(output_dir, output_dir / "model", output_dir / "metrics.jsonl", steps, summary)


def split_eval(records: list[R], size: int, seed: int) -> tuple[list[R], list[R]]:
    """Hold out ``size`` records chosen by ``seed`` (when no eval file is given); both re-indexed.

    Records from one source row (KTO's two halves of a preference pair) stay on the same side, so no
    held-out prompt has its other half in training: the held-out set may then hold slightly more than
    ``size`` records.
    """
    if size >= len(records):
        raise ConfigError(f"data.eval_size: must be smaller than the {len(records)} training rows, got {size}")
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(getattr(r, "row", 0) or i + 1_000_000_000, []).append(i)  # no row: its own group
    keys = list(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    held: set[int] = set()
    for k in order:
        if len(held) >= size:
            break
        held.update(groups[keys[k]])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [records[i] for i in sorted(held)]
    reindex = lambda rs: [dataclasses.replace(r, index=i) for i, r in enumerate(rs)]  # noqa: E731
    return reindex(train), reindex(evals)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The data set positions of optimizer step ``step``: a seeded permutation per epoch, last partial
    batch of an epoch dropped. Pure function of (step, seed): resuming needs no data-loader state."""
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return host_values(order[offset * batch_size : (offset + 1) * batch_size])


# Keys that may change between a run and its resumption: they decide only when and where to log, evaluate and save,
# how many processes share the work (checkpoints hold full, unsharded state: N processes resume on M) and
# whether the kernels are the deterministic ones (the same maths, other rounding on a GPU).
RESUME_MAY_CHANGE = frozenset(
    {"eval_steps", "save_steps", "keep_resumable", "logging_steps", "distributed", "deterministic", "report_to",
     "log_completions"}
)  # fmt: skip


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must be the run that was saved: same method, data, schedule (max_steps included), seed.

    The saved config is read back first, so keys added to the config since it was written compare at their
    defaults instead of as changes."""
    if saved:
        saved = load(saved).to_dict()
    changed = rundir.config_changes(saved, current, RESUME_MAY_CHANGE)  # (a moved run folder is no change)
    if saved and changed:
        raise ConfigError(
            "--resume: the config differs from the checkpoint's (" + "; ".join(changed) + "); resuming would "
            "silently train a different run: revert the change or start a new run from the checkpoint's model"
        )


def evaluate(
    task: OfflineTask[Any, Any],
    model: nn.Module,
    records: Sequence[Any],
    micro_batch_size: int,
    at_start: bool = False,
) -> dict[str, float]:
    """The task's loss and metrics over a whole eval split, with the same reduction as training; each process
    scores its share of the records and the sums are added over the processes.

    FSDP2 gathers weights in every forward, so its processes must run as many forwards each: a share a
    micro-batch short runs a filler whose figures are dropped (:func:`posttrain.distributed.lockstep`)."""
    counts = task.counts(records)
    chunks = distributed.my_chunks(records, micro_batch_size)
    sums = MetricSums()
    was_training = model.training
    model.eval()
    with distributed.forward_only(model):
        context = task.step_context(model, records, "eval")
        for chunk, real in distributed.lockstep(chunks, model, filler=records[:1]):
            task.loss(model, task.collate(chunk), "eval", counts, sums if real else MetricSums(), context,
                      at_start=at_start)  # fmt: skip
    model.train(was_training)
    return task.finish_figures(sums.mean(counts))


def check_processes(config: TrainConfig) -> None:
    """What a torchrun launch of several processes needs from the config, checked before anything is
    written: every process takes an equal share of each global batch."""
    world = distributed.world_size()
    if world > 1 and config.batch_size % world:
        raise ConfigError(
            f"batch_size: {config.batch_size} is not a multiple of the {world} processes; each process takes an "
            "equal share of every global batch"
        )


def load_policy(task: OfflineTask[Any, Any], config: TrainConfig, device: torch.device | None) -> nn.Module:
    """The policy at its starting weights (with fresh LoRA adapters when configured), on ``device`` (None:
    where it was built, e.g. a skeleton's meta device)."""
    policy = task.load_model(config.model, device=device)
    policy = policy if device is None else policy.to(device)
    if config.lora is not None:  # only the adapters train; the base doubles as the reference
        policy = lora.apply_lora(policy, config.lora, task.lora_task_type)
        if config.gradient_checkpointing:
            policy.enable_input_require_grads()  # type: ignore[operator]
    return policy


def run(
    source: str | Path | dict[str, Any] | TrainConfig, overrides: Sequence[str] = (), resume: bool = False
) -> RunResult:
    """Train one offline method end to end (``posttrain train`` picks the loop: posttrain.training.dispatch)."""
    # 1. Config, tokenizer and data: every row is validated and tokenized once, before anything is written.
    config = load(source, overrides)
    if isinstance(config.algorithm, OnlineAlgorithm):
        raise ConfigError(
            f"method: {config.method} is an online method; posttrain.train or posttrain.training.dispatch.run runs it"
        )
    check_models(config)  # the model paths, before anything loads or is written
    with remote_code(config.trust_remote_code):  # every model load of the run honours the key
        return _run(config, resume)


def _run(config: TrainConfig, resume: bool) -> RunResult:
    determinism.configure(config.deterministic)  # first: before anything starts CUDA (and cuBLAS)
    lora.check_quantization(config)
    distributed.setup()  # torchrun: join the other processes (nothing with one)
    check_processes(config)
    with rundir.claim(Path(config.output_dir), resume) as folder:  # locked and checked before anything loads
        return _train(config, folder)


def _train(config: TrainConfig, folder: rundir.RunFolder) -> RunResult:
    """The offline loop in a claimed run folder: its start (step 0 or a checkpoint) is decided."""
    device = distributed.device()
    log = tqdm.write if distributed.is_main() else lambda _: None
    with distributed.main_first():  # an embedded model is converted once, by the first process
        tokenizer = load_tokenizer(config.model)
    task = task_for(config, tokenizer, device)
    records, stats = task.load_records(config.data.train, config.data.split)
    log(f"train data: {stats.summary()}")
    eval_records: list[Any] = []
    if config.data.eval:
        eval_records, eval_stats = task.load_records(config.data.eval, config.data.split)
        log(f"eval data: {eval_stats.summary()}")
    elif config.data.eval_size:
        records, eval_records = split_eval(records, config.data.eval_size, config.seed)
    if len(records) < config.batch_size:
        raise ConfigError(f"batch_size: {config.batch_size} is larger than the {len(records)} training examples")

    # 2. Output directory, then the policy and its reference (built from the starting weights).
    output_dir, last = folder.path, folder.checkpoint
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    policy = load_policy(task, config, device)
    log(f"layout: {task.choose_layout(policy)}")
    splits = {"train": records, **({"eval": eval_records} if eval_records else {})}
    # What the run trains on and from: kept in each checkpoint, compared on resume (the weights before any
    # are loaded: the starting model's).
    fingerprints = rundir.fingerprints(policy, splits) if config.save_steps or last is not None else {}
    t_ref = time.perf_counter()
    task.prepare_references(policy, splits, resumed=last is not None)
    reference_s = time.perf_counter() - t_ref
    if last is not None and lora.is_lora(policy):  # now load the trained weights
        lora.load_adapter_weights(policy, last)
    elif last is not None:
        policy.load_state_dict(task.load_model(str(last)).state_dict())
    # Several processes: a replica per process (ddp) or shards of it (fsdp2); after the reference copy.
    policy = distributed.prepare(policy, config.distributed.strategy)
    if compiled.wanted(config.compile, device):  # the decoder layers; attention stays outside the graph
        try:
            compiled.compile_layers(policy)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    # 3. Optimizer and schedule; a resumed run restores them with the RNG and the step.
    per_epoch = len(records) // config.batch_size
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    optimizer = build_optimizer(policy, config.lr, config.adam_betas, config.adam_eps, config.weight_decay)
    scheduler = build_scheduler(optimizer, total, config.warmup_ratio, config.lr_scheduler)
    start, state = 0, {}
    if last is not None:
        state = checkpoint.load_state(last)
        check_resumable(state.get("config", {}), config.to_dict())
        rundir.check_fingerprints(state.get("fingerprints"), fingerprints, config)
        distributed.load_optimizer_state(policy, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.restore_rng(state)
        start = int(state["step"])
        log(f"resumed from {last} at step {start}")
    rundir.write_config(output_dir, config)
    disk.check(config, output_dir, policy, None, start, total)  # one line when the disk is too small
    writer = MetricsWriter(output_dir / "metrics.jsonl", open_trackers(config, output_dir, start))
    if start:  # lines a killed run wrote after its last checkpoint are replayed: drop them
        writer.keep_until(start)
    resumable: dict[str, Any] = {"config": config.to_dict(), "fingerprints": fingerprints}
    micro = config.micro_batch_size or config.batch_size

    def save(step: int, model_dir: Path | None = None, stop: bool = False) -> None:
        """The checkpoint of ``step`` (and the final model into ``model_dir``): full, unsharded state, so
        any number of processes can resume it. Every process takes part (gathering shards is collective);
        the first one writes. Without ``save_steps`` only a ``stop`` writes one."""
        plain = distributed.unsharded(policy, lambda: load_policy(task, config, None))
        with_state = bool(config.save_steps) or stop
        opt_state = distributed.optimizer_state(policy, optimizer) if with_state else {}
        if plain is not None and distributed.is_main():
            if model_dir is not None:
                checkpoint.save_model(lora.for_saving(plain, config.lora.save) if config.lora else plain,
                                      tokenizer, model_dir)  # fmt: skip
            if with_state:
                checkpoint.save_checkpoint(output_dir, step, plain, tokenizer, opt_state, scheduler, resumable,
                                           config.keep_resumable, same=model_dir, stop=stop)  # fmt: skip
        distributed.barrier()

    summary: dict[str, Any] = {"method": config.method, "model": config.model, "steps": total, "layout": task.layout}
    summary["reference_time_s"] = round(reference_s, 2)  # building the reference (a cache: computed or read)

    def run_eval(step: int, at_start: bool = False) -> dict[str, float]:
        figures = evaluate(task, policy, eval_records, micro, at_start=at_start)
        writer.write({"split": "eval", "step": step, **figures})
        return figures

    # 4. Evaluation before training (the "before" of the summary, kept in checkpoints); a run stopped at an
    # eval_steps step evaluates now what it did not then.
    if eval_records and start == 0:
        summary["heldout_before"] = resumable["heldout_before"] = run_eval(0, at_start=True)
    elif "heldout_before" in state:
        summary["heldout_before"] = resumable["heldout_before"] = state["heldout_before"]
    if state.get("eval_pending"):
        run_eval(start)

    # 5. The loop: one global batch per optimizer step, split into micro-batches.
    progress = tqdm(
        total=total, initial=start, desc=config.method, dynamic_ncols=True, disable=not distributed.is_main()
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    guard = NonFiniteGuard([optimizer], config.skip_nonfinite_steps, config.lr)
    policy.train()
    peaks = memory.peak_memory(device)  # read again at each logging step (no device sync: allocator counters)
    started = time.perf_counter()
    for step in range(start, total):
        t0 = time.perf_counter()
        step_records = [records[i] for i in batch_indices(step, len(records), config.batch_size, config.seed)]
        counts = task.counts(step_records)  # global: the loss of each micro-batch is divided by these
        mine = step_records[distributed.shard(len(step_records))]  # this process's share of the global batch
        context = task.step_context(policy, step_records, "train")  # each process scores its share inside
        sums = MetricSums()
        for mb_start in range(0, len(mine), micro):
            batch = task.collate(mine[mb_start : mb_start + micro])
            sums.add(TOKENS, batch.attention_mask, per="total")  # a host tensor: read with the figures
            # Span layouts: gradient checkpointing recomputes attention in backward, under the same switch.
            with span_attention(policy, on=getattr(batch, "spans", None) is not None):
                task.loss(policy, batch, "train", counts, sums, context).backward()
        distributed.reduce_gradients(params)  # the processes' shares summed: the whole batch's gradient
        grad_norm = distributed.clip_grad_norm(params, config.max_grad_norm or math.inf)
        lr = scheduler.get_last_lr()[0]
        if guard.before_step(grad_norm):  # a non-finite update is skipped on the device when allowed
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums.add(stopping.FIGURE, stopping.flag(), per="total")  # SIGTERM (a host scalar), summed over processes
        # The step's one device-to-host read: every figure, the token count and the gradient norm at once.
        figures = sums.mean(counts, extra={"grad_norm": grad_norm})
        stop = figures.pop(stopping.FIGURE) > 0
        figures = task.finish_figures(figures)
        tokens, norm = figures.pop(TOKENS), figures.pop("grad_norm")
        skipped = guard.check(step + 1, figures["loss"], norm)  # a NaN/inf stops the run here, before any save
        if guard.saturated(norm):
            log(f"warning: step {step + 1}: the gradient norm is exactly 0 (a saturated model? learning_rate "
                f"{config.lr:g} may be far too high)")  # fmt: skip
        elapsed = time.perf_counter() - t0
        progress.update(1)
        shown = {"loss": f"{figures['loss']:.4f}"}
        if "accuracy" in figures:
            shown["acc"] = f"{figures['accuracy']:.2f}"
        progress.set_postfix({**shown, **memory.shown(peaks)})  # (memory as of the last metrics line)
        if (step + 1) % config.logging_steps == 0 or step + 1 == total:
            peaks = memory.peak_memory(device)
            writer.write({"split": "train", "step": step + 1, "epoch": (step + 1) / per_epoch, **figures, **peaks,
                          "grad_norm": norm, "lr": lr, "tokens_per_s": tokens / elapsed,
                          "step_time_s": elapsed, **({"skipped": True} if skipped else {})})  # fmt: skip
        if stop and step + 1 < total:  # a checkpoint of this step, then out (the last step finishes the run)
            # (without save_steps the starting weights were not fingerprinted: a resume checks the data only)
            resumable["fingerprints"] = fingerprints or rundir.fingerprints(None, splits)
            resumable["eval_pending"] = bool(eval_records and config.eval_steps and (step + 1) % config.eval_steps == 0)
            save(step + 1, stop=True)
            progress.close()
            if distributed.is_main():
                writer.close()  # the trackers of report_to
            raise stopping.Stopped.at_step(step + 1, total, checkpoint.step_dir(output_dir, step + 1))
        if eval_records and config.eval_steps and (step + 1) % config.eval_steps == 0 and step + 1 < total:
            run_eval(step + 1)
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < total:
            save(step + 1)
    progress.close()
    summary["train_time_s"] = round(time.perf_counter() - started, 1)  # the optimizer steps of this process
    summary["skipped_steps"] = guard.skipped

    # 6. Evaluation after training, the final model (and with save_steps the end state too: resuming a
    # finished run is a no-op, not a retrain), the summary.
    if eval_records:
        summary["heldout_after"] = run_eval(total)
    model_dir = output_dir / "model"
    save(total, model_dir)
    summary.update(memory.peak_memory(device))  # peak RSS, and peak GPU memory on a CUDA device
    if distributed.is_main():
        checkpoint.drop_stops(output_dir)  # a stopped run's folder holds what an uninterrupted one's holds
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_card(model_dir, config, summary)  # model/README.md, the model card
        writer.close()  # the trackers of report_to
    return RunResult(output_dir, model_dir, output_dir / "metrics.jsonl", total, summary)
