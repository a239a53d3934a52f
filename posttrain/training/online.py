"""The online loop: prompts -> generation -> rewards -> advantages -> old / reference log-probs -> K passes.

Every online method runs through :func:`run_online`, the loop alone; what GRPO (with its Dr. GRPO / DAPO /
GSPO settings), RLOO and PPO need, their targets and their losses sit behind one seam
(:class:`posttrain.training.online_methods.OnlineMethod`). Sampling always
uses the CURRENT policy module (the generator holds it, never a copy); every log-prob of a sample (policy,
old policy, reference) is computed from logits divided by the sampling temperature.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from posttrain import determinism, distributed
from posttrain.algorithms.online import OnlineAlgorithm
from posttrain.config import ConfigError, TrainConfig
from posttrain.data.prompts import load_prompts
from posttrain.data.tokenize import Renderer
from posttrain.host import host_values
from posttrain.model import lora
from posttrain.model.load import evaluation_mode, freeze, load_causal_lm, load_tokenizer
from posttrain.model.spans import resolve_layout, span_attention
from posttrain.model.value import SeparateCritic, SharedCritic
from posttrain.report.card import write_card
from posttrain.rollout.advantages import tied_groups
from posttrain.rollout.generate import Generator, SamplingParams
from posttrain.tracking import open_trackers
from posttrain.training import checkpoint, disk, memory, rundir, stopping
from posttrain.training.completions import CompletionsLog
from posttrain.training.guard import NonFiniteGuard
from posttrain.training.metrics import MetricSums, MetricsWriter
from posttrain.training.offline import (
    RunResult,
    batch_indices,
    check_processes,
    check_resumable,
)
from posttrain.training.online_methods import online_method
from posttrain.training.optim import build_optimizer, build_scheduler
from posttrain.training.ppo import critic_values
from posttrain.training.rollouts import (
    Samples,
    Scorer,
    default_generator,
    gathered,
    heldout_figures,
    method_rewards,
    refill_informative,
    sample_all,
)


def run_online(
    config: TrainConfig, resume: bool = False, generator_factory: Callable[[nn.Module, Any], Generator] | None = None
) -> RunResult:
    """Train one online method end to end. ``generator_factory(policy, tokenizer)`` swaps the HF backend
    (tests pass a deterministic double)."""
    alg = config.algorithm
    assert isinstance(alg, OnlineAlgorithm)
    determinism.configure(config.deterministic)  # first: before anything starts CUDA (and cuBLAS)
    # 1. Prompts and rewards: validated before anything is written.
    lora.check_quantization(config)
    distributed.setup()  # torchrun: join the other processes (nothing with one)
    check_processes(config)
    if distributed.world_size() > 1 and config.distributed.strategy == "fsdp2" and config.generation.backend == "vllm":
        raise ConfigError(
            "distributed.strategy: fsdp2 with generation.backend: vllm is not supported (the engine would need the "
            "full weights gathered for every rollout); use ddp, or the hf backend"
        )
    with rundir.claim(Path(config.output_dir), resume) as folder:  # locked and checked before anything loads
        return _train_online(config, folder, generator_factory)


def _train_online(
    config: TrainConfig, folder: rundir.RunFolder, generator_factory: Callable[[nn.Module, Any], Generator] | None
) -> RunResult:
    """The online loop in a claimed run folder: its start (step 0 or a checkpoint) is decided."""
    alg = config.algorithm
    assert isinstance(alg, OnlineAlgorithm)
    method = online_method(config)  # what the method needs, its targets and its loss
    reward_fn = method_rewards(config)
    make_generator = generator_factory or default_generator(config)
    with distributed.main_first():  # an embedded model is converted once, by the first process
        tokenizer = load_tokenizer(config.model)
    renderer = Renderer(tokenizer, config.data.chat_template)
    prompts, stats = load_prompts(config.data.train, config.data.split, renderer, config.data.prompt_limit)
    reward_fn.check_columns(config.data.train, prompts)
    log = tqdm.write if distributed.is_main() else lambda _: None
    log(f"train prompts: {stats.summary()}")
    if len(prompts) < config.batch_size:
        raise ConfigError(f"batch_size: {config.batch_size} is larger than the {len(prompts)} training prompts")
    eval_prompts = (
        load_prompts(config.data.eval, config.data.split, renderer, config.data.prompt_limit)[0]
        if (config.data.eval)
        else []
    )
    if config.data.eval:
        reward_fn.check_columns(config.data.eval, eval_prompts)

    # 2. Output directory, policy, reference (config.uses_reference: beta > 0), generator.
    output_dir, last = folder.path, folder.checkpoint
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = distributed.device()
    strategy = config.distributed.strategy

    def start_policy(where: torch.device | None) -> nn.Module:  # the starting weights (fresh adapters with LoRA)
        quantized = lora.four_bit(config.lora, config.precision, where or device)  # QLoRA: the base in 4-bit
        model = load_causal_lm(config.model, gradient_checkpointing=config.gradient_checkpointing, quantized=quantized)
        model = model if where is None else model.to(where)  # (None: a skeleton, on the meta device)
        return lora.apply_lora(model, config.lora) if config.lora is not None else model

    policy = start_policy(device)
    # What the run trains on and from: kept in each checkpoint, compared on resume.
    splits = {"train": prompts, "eval": eval_prompts}
    fingerprints = rundir.fingerprints(policy, splits) if config.save_steps or last is not None else {}
    ref_model: nn.Module | None = None
    ref_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    if config.uses_reference:  # beta > 0 (reference.kind is copy: checked when the config was read)
        if lora.is_lora(policy):
            ref_model, ref_context = policy, lora.adapters_off(policy)
        elif config.reference.model:
            ref_model = load_causal_lm(config.reference.model, trainable=False).to(device)
        else:
            ref_model = freeze(copy.deepcopy(policy))
        if strategy == "fsdp2" and ref_model is not policy:  # scored while the policy trains: sharded like it
            ref_model = distributed.prepare(ref_model, "fsdp2")
    generator = make_generator(policy, tokenizer)
    gen = config.generation
    params = SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k, gen.stop)
    longest = config.data.prompt_limit + gen.max_new_tokens
    try:
        layout = resolve_layout(config.layout, "shared_prefix", policy, longest)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    log(f"layout: {layout}")
    score = Scorer(config, device, layout=layout)
    n = alg.num_generations
    # Passes over each rollout (GRPO's mu, PPO's epochs) and optimizer steps per pass (PPO's minibatches).
    passes, minibatches = method.passes, method.minibatches
    mask_truncated = alg.masks_truncated(gen)
    critic, start_critic = method.build_critic(policy, tokenizer, device)  # (PPO's: a value head or a model)
    if isinstance(critic, SeparateCritic) and critic.new_head:  # transformers' load report calls it MISSING
        log("critic: its value head (score.weight) is new and starts at zero; a load report's MISSING is expected")

    # 3. A resumed run's trained weights, then the models made data-parallel, then optimizers and schedules
    # (one optimizer step per minibatch of each pass over a rollout; built on fsdp2's sharded parameters).
    per_epoch = len(prompts) // config.batch_size
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    summary: dict[str, Any] = {"method": alg.name, "model": config.model, "steps": total, "layout": layout}
    start = 0
    state: dict[str, Any] = {}
    if last is not None:  # the trained weights, the optimizers' and schedules' state, the RNG, the step
        state = checkpoint.load_state(last)
        check_resumable(state.get("config", {}), config.to_dict())
        rundir.check_fingerprints(state.get("fingerprints"), fingerprints, config)
        if lora.is_lora(policy):
            lora.load_adapter_weights(policy, last)
        else:
            policy.load_state_dict(load_causal_lm(str(last), trainable=False).state_dict())
        if critic is not None:
            critic.load_state_dict(state["critic"])
    # Several processes: a replica (ddp) or shards (fsdp2) of each trained model per process; a value head
    # on the policy's trunk is small and always replicated.
    policy = distributed.prepare(policy, strategy)
    if critic is not None:
        critic = distributed.prepare(critic, "ddp" if isinstance(critic, SharedCritic) else strategy)
    optimizer = build_optimizer(policy, config.lr, config.adam_betas, config.adam_eps, config.weight_decay)
    scheduler = build_scheduler(optimizer, total * passes * minibatches, config.warmup_ratio, config.lr_scheduler)
    steppers: list[tuple[torch.optim.Optimizer, Any]] = [(optimizer, scheduler)]
    if critic is not None:
        critic_lr = method.critic_learning_rate()
        critic_opt = build_optimizer(critic, critic_lr, config.adam_betas, config.adam_eps, config.weight_decay)
        critic_sched = build_scheduler(critic_opt, total * passes * minibatches, config.warmup_ratio,
                                       config.lr_scheduler)  # fmt: skip
        steppers.append((critic_opt, critic_sched))
    trained = [policy, critic] if critic is not None else [policy]  # the model of each stepper
    if last is not None:
        for model, (opt, sched), (o, sc) in zip(trained, steppers, state["optimizers"], strict=True):
            distributed.load_optimizer_state(model, opt, o if o is not None else state["optimizer"])
            sched.load_state_dict(sc)
        checkpoint.restore_rng(state)
        start, method.kl_coef, summary = int(state["step"]), float(state["kl_coef"]), dict(state["summary"])
        log(f"resumed from {last} at step {start}")
    rundir.write_config(output_dir, config)
    disk.check(config, output_dir, policy, critic, start, total)  # one line when the disk is too small
    writer = MetricsWriter(output_dir / "metrics.jsonl", open_trackers(config, output_dir, start))
    samples_log = CompletionsLog(output_dir / "completions.jsonl", config.log_completions, tokenizer, start)
    if start:  # lines a killed run wrote after its last checkpoint are replayed: drop them
        writer.keep_until(start)

    def plain_models() -> tuple[nn.Module | None, nn.Module | None]:
        """The policy and the critic as plain modules, for saving (the first process; every process takes
        part: under fsdp2 the shards are gathered)."""
        plain = distributed.unsharded(policy, lambda: start_policy(None))
        plain_critic = None
        if critic is not None:
            plain_critic = distributed.unsharded(critic, start_critic or (lambda: critic))
        return plain, plain_critic

    def save(
        step: int, plains: tuple[nn.Module | None, nn.Module | None] | None = None, same: Path | None = None,
        stop: bool = False,
    ) -> None:  # fmt: skip
        """The checkpoint of ``step``: full, unsharded state, so any number of processes resumes it
        (``plains``: :func:`plain_models` already gathered; ``same``: the final model, its weights stored once;
        ``stop``: written by a stop)."""
        plain, plain_critic = plains or plain_models()
        optimizers = [
            (distributed.optimizer_state(m, o), sc.state_dict()) for m, (o, sc) in zip(trained, steppers, strict=True)
        ]
        if plain is not None and distributed.is_main():
            # The policy's optimizer state once, as "optimizer" (None in its "optimizers" place: it was stored
            # twice, 2/3 of an online checkpoint's state, until 2026-12-07; such checkpoints still load).
            listed = [(None, optimizers[0][1]), *optimizers[1:]]
            extra = {"config": config.to_dict(), "summary": summary, "kl_coef": method.kl_coef,
                     "optimizers": listed, "fingerprints": fingerprints,
                     "critic": plain_critic.state_dict() if plain_critic is not None else None}  # fmt: skip
            checkpoint.save_checkpoint(output_dir, step, plain, tokenizer, optimizers[0][0], scheduler, extra,
                                       config.keep_resumable, same, stop)  # fmt: skip
        distributed.barrier()

    micro = (config.micro_batch_size or config.batch_size) * n  # sequences per forward

    def evaluate(step: int) -> dict[str, float]:
        with distributed.full_weights(policy):
            figures = heldout_figures(generator, reward_fn, eval_prompts, config, tokenizer.pad_token_id)
        writer.write({"split": "eval", "step": step, **figures})
        return figures

    if eval_prompts and not start:
        summary["heldout_before"] = evaluate(0)
    started = time.perf_counter()

    # 4. The loop.
    progress = tqdm(total=total, initial=start, desc=alg.name, dynamic_ncols=True, disable=not distributed.is_main())
    params_trained = [p for p in policy.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad] if critic is not None else []
    shared = isinstance(critic, SharedCritic)
    guard = NonFiniteGuard([opt for opt, _ in steppers], config.skip_nonfinite_steps, config.lr)

    def draw(batch: list[Any], seed: int) -> Samples:
        return sample_all(generator, reward_fn, batch, n, params, seed, tokenizer.pad_token_id, mask_truncated)

    for step in range(start, total):
        t0 = time.perf_counter()
        method.begin_step(step)  # (PPO's critic warm-up: which steps train the critic alone)
        batch = [prompts[i] for i in batch_indices(step, len(prompts), config.batch_size, config.seed)]
        draw_seed = config.seed * 1_000_003 + step
        # Each process samples its share of the prompts (whole groups); all of them get the whole rollout.
        with distributed.full_weights(policy):  # fsdp2: the weights gathered once for every decoding step
            s = draw(batch, draw_seed)
            tied_share = host_values(tied_groups(s.rewards, n).double().mean()) if n > 1 else 0.0
            resampled = 0
            if method.dynamic_sampling:
                s, resampled = refill_informative(s, draw, prompts, config.batch_size, n, method.max_resample,
                                                  draw_seed, tokenizer.pad_token_id)  # fmt: skip
        everything = torch.arange(len(s.rewards))
        t_sampled = time.perf_counter()
        # Reference and old-policy log-probs (and old values) before any update.
        with distributed.forward_only(policy, *([critic] if critic is not None else [])):
            # Each process scores its share of the rows; the shares are gathered, so that advantages, KL
            # penalties and PPO's whitening are computed over the whole rollout, as with one process.
            # (fsdp2: every process runs as many forwards, a filler row where its share is a micro-batch short)
            ref = old = old_values = None
            mine = everything[distributed.shard(len(everything))]
            chunks = distributed.lockstep(mine.split(micro), policy, filler=everything[:1])
            if ref_model is not None:
                with evaluation_mode(ref_model), ref_context():
                    refs = [(score(ref_model, s, r).logps, real) for r, real in chunks]
                ref = gathered([x for x, real in refs if real], s)
            if method.needs_old(reference=ref is not None):
                outs = [(r, score(policy, s, r, hidden=shared), real) for r, real in chunks]
                old = gathered([o.logps for _, o, real in outs if real], s)
                if critic is not None:
                    vs = [(critic_values(critic, *s.rows(r, device), o), real) for r, o, real in outs]
                    old_values = gathered([v for v, real in vs if real], s)
                del outs
        t_scored = time.perf_counter()
        rollout_tokens = host_values(s.loss_mask.sum())  # (the rollout is on the host)
        targets = method.targets(s, old, ref, old_values, tokens=rollout_tokens)  # advantages, PPO's returns
        # Figures stay on the device through the passes and are read once, after them (tests/test_syncs.py).
        on_device = MetricSums()
        done = 0
        for k in range(passes):
            approx_kl, pass_tokens = torch.zeros((), device=device), torch.zeros((), device=device)
            # PPO shuffles the rollout into minibatches, one optimizer step each; the others take it whole.
            # The shuffle has a generator of its own, seeded by (step, pass): every process draws the same
            # one, whatever the forwards before it consumed of the global RNG (dropout).
            shuffle = torch.Generator().manual_seed(draw_seed * 1009 + k)
            order = torch.randperm(len(s.rewards), generator=shuffle) if minibatches > 1 else everything
            for j, mb in enumerate(order.tensor_split(minibatches)):
                mb_tokens = host_values(s.loss_mask[mb].sum(-1))  # the rollout is on the host
                # counts of the whole minibatch: each process trains on its share
                counts = {"tokens": sum(mb_tokens), "sequences": sum(1 for t in mb_tokens if t > 0)}
                share = mb[distributed.shard(len(mb))].split(micro)
                for r, real in distributed.lockstep(share, policy, filler=everything[:1]):
                    # The entropy is measured on the first minibatch of the first pass (every process's share).
                    cur = score(policy, s, r, entropy=real and k == 0 and j == 0, hidden=shared)
                    values = critic_values(critic, *s.rows(r, device), cur) if critic is not None else None
                    loss, metrics = method.loss(cur, r, targets, counts, values)
                    # (recomputed layers: see spans.py; a shared trunk's rows are scored padded)
                    with span_attention(policy, on=layout != "padded" and not shared):
                        (loss if real else loss * 0.0).backward()  # (a filler's backward: zero gradients)
                    if not real:
                        continue
                    on_device.add("loss", loss, per="total")
                    for name, value in metrics.items():
                        on_device.add(name, value, per="total")
                    if "approx_kl_sum" in metrics:
                        approx_kl = approx_kl + metrics["approx_kl_sum"].detach().sum()
                    pass_tokens = pass_tokens + cur.mask.sum()
                    if cur.entropy is not None:
                        on_device.add("entropy_sum", cur.entropy * cur.mask, per="total")
                        on_device.add("entropy_tokens", cur.mask, per="total")
                distributed.reduce_gradients(params_trained + critic_params)  # the shares summed
                grad_norm = distributed.clip_grad_norm(params_trained, config.max_grad_norm or math.inf)
                lr = scheduler.get_last_lr()[0]
                if critic_params:
                    distributed.clip_grad_norm(critic_params, config.max_grad_norm or math.inf)
                run_update = guard.before_step(grad_norm)  # a non-finite update is skipped on the device
                for opt, sched in steppers:
                    if run_update:
                        opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
            done += 1
            if not method.keep_passing(approx_kl, pass_tokens):  # (PPO's target_kl: a read per pass)
                break  # the policy has moved far enough from the one that sampled: stop this rollout's passes
        # The one read of the training passes: the figures summed over micro-batches and processes, the norm,
        # the rollout-level figures computed on the device.
        extra = {"grad_norm": grad_norm, **targets.figures}
        extra.update(samples_log.on_device(targets.advantages, s.loss_mask))
        on_device.add(stopping.FIGURE, stopping.flag(), per="total")  # SIGTERM (a host scalar), over processes
        sums = on_device.mean(extra=extra)  # (every figure added per="total")
        stop = sums.pop(stopping.FIGURE) > 0
        norm = sums.pop("grad_norm")
        rollout_figures = {name: sums.pop(name) for name in list(extra)[1:]}
        samples_log.write(step + 1, s, batch, rollout_figures)  # (takes its rows' advantages out of the figures)
        for name in list(sums):  # per pass, as one pass over the rollout would report
            if name not in ("entropy_sum", "entropy_tokens"):
                sums[name] /= done
        skipped = guard.check(step + 1, sums["loss"], norm)  # a NaN/inf stops the run here, before any save
        tokens = max(1, rollout_tokens)
        rewards = s.rewards.double()  # the rollout's figures: host tensors
        figures = {
            "loss": sums["loss"], "reward": host_values(rewards.mean()), "reward_std": host_values(rewards.std()),
            **{f"reward/{k}": host_values(v.double().mean()) for k, v in s.per_reward.items()},
            "tied_groups": tied_share, "resampled": resampled, "groups": len(s.rewards) // n,
            "tied_groups_trained": host_values(tied_groups(s.rewards, n).double().mean()) if n > 1 else 0.0,
            "completion_length": host_values(s.lengths.double().mean()),
            "truncated": host_values(s.truncated.double().mean()),
            "grad_norm": norm, "lr": lr, "step_time_s": time.perf_counter() - t0,
            "sample_time_s": t_sampled - t0, "score_time_s": t_scored - t_sampled,
            **({"skipped": True} if skipped else {}), **rollout_figures,
        }  # fmt: skip
        if "clipped_low_tokens" in sums:
            figures["clip_low"] = sums["clipped_low_tokens"] / tokens
            figures["clip_high"] = sums["clipped_high_tokens"] / tokens
            figures["approx_kl_old"] = sums["approx_kl_sum"] / tokens
        if "kl_sum" in sums:
            figures["kl"] = sums["kl_sum"] / tokens
        if "entropy_sum" in sums:
            figures["entropy"] = sums["entropy_sum"] / max(1.0, sums["entropy_tokens"])
        method.add_figures(figures, sums, tokens, done)  # (PPO's: beta, value loss ...; its adaptive KL moves)
        peaks = memory.peak_memory(device)  # (allocator counters: no device sync)
        writer.write({"split": "train", "step": step + 1, **figures, **peaks})
        progress.update(1)
        shown = {"reward": f"{figures['reward']:.3f}", "loss": f"{figures['loss']:.4f}"}
        progress.set_postfix({**shown, **memory.shown(peaks)})
        if stop and step + 1 < total:  # a checkpoint of this step, then out (the last step finishes the run)
            # (without save_steps the starting weights were not fingerprinted: a resume checks the data only)
            fingerprints = fingerprints or rundir.fingerprints(None, splits)
            save(step + 1, stop=True)
            progress.close()
            if distributed.is_main():
                writer.close()  # the trackers of report_to
            raise stopping.Stopped.at_step(step + 1, total, checkpoint.step_dir(output_dir, step + 1))
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < total:
            save(step + 1)
    progress.close()

    # 5. Evaluation after training, the final model, the summary.
    if eval_prompts:
        summary["heldout_after"] = evaluate(total)
    model_dir = output_dir / "model"
    plain, plain_critic = plain_models()
    if plain is not None and distributed.is_main():
        final = lora.for_saving(plain, config.lora.save) if config.lora else plain
        checkpoint.save_model(final, tokenizer, model_dir)
        if isinstance(plain_critic, (SeparateCritic, SharedCritic)):
            final_critic = plain_critic  # (the closure's own name: plain_critic is deleted below)
            checkpoint.write_atomically(output_dir / "critic", lambda tmp: final_critic.save(tmp, tokenizer))
    if config.save_steps:  # the end state too: resuming a finished run is a no-op, not a retrain
        save(total, (plain, plain_critic), model_dir)
    del plain, plain_critic
    summary["train_time_s"] = round(time.perf_counter() - started, 1)
    summary["skipped_steps"] = guard.skipped
    summary.update(memory.peak_memory(device))  # peak RSS, and peak GPU memory on a CUDA device
    if distributed.is_main():  # (the first process's figures)
        checkpoint.drop_stops(output_dir)  # a stopped run's folder holds what an uninterrupted one's holds
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_card(model_dir, config, summary)  # model/README.md, the model card
        writer.close()  # the trackers of report_to
    distributed.barrier()
    return RunResult(output_dir, model_dir, output_dir / "metrics.jsonl", total, summary)
