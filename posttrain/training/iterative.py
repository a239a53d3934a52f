"""Iterative DPO: rounds of (sample N per prompt -> score -> best-vs-worst pairs -> offline DPO-family run).

No loop of its own: each round's training is the offline loop (:func:`posttrain.training.offline.run`) on
the pairs the round saved, so every offline lever (reference cache, LoRA, checkpoints) applies, and each
round's ``pairs.jsonl`` can be trained on again with ``posttrain train`` alone.

Each round's ``pairs.jsonl`` holds ``prompt``, ``chosen``, ``rejected``, their scores (``score_chosen``,
``score_rejected``) and ``margin``, the chosen's score minus the rejected's: the target of ``loss: distill``
(a reward model trained on the file reads it as Llama 2's margin).

Layout of ``output_dir``: ``config.yaml``, ``round-1/pairs.jsonl``, ``round-1/round.json`` (the round's figures,
written with its pairs), ``round-1/train/`` (an offline run), ..., ``model/`` (the last round's model),
``summary.json``.

``--resume`` continues a killed or failed run round by round: a round whose training finished is kept as it
is; a round whose pairs were written keeps them (sampling is not repeated) and resumes its offline run from
its last checkpoint (or starts it again); a round killed while sampling starts again. The config must be the
one the run was started with (as for an offline resume).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from posttrain import determinism, distributed
from posttrain.algorithms.online import IterativeDPO
from posttrain.config import ConfigError, TrainConfig
from posttrain.data.prompts import PromptRecord, load_prompts
from posttrain.data.tokenize import Renderer
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.report.card import write_card
from posttrain.rollout.generate import Generator, SamplingParams
from posttrain.rollout.pairs import best_worst_pairs
from posttrain.training import checkpoint, first_round, memory, rundir, stopping
from posttrain.training.offline import RunResult, check_resumable, run
from posttrain.training.rollouts import default_generator, heldout_figures, method_rewards, sample_all


def round_config(config: TrainConfig, pairs_file: Path, model: str, out: Path) -> dict[str, Any]:
    """The offline run of one round: the chosen DPO-family loss on the round's pairs."""
    alg = config.algorithm
    assert isinstance(alg, IterativeDPO)
    cfg = config.to_dict()
    for key in ("rewards", "generation", "num_generations", "rounds", "tie_threshold", "pairs_per_prompt", "loss",
                "reference_update", "steps_per_round", "prompts_per_round", "beta", "rpo_alpha"):  # fmt: skip
        cfg.pop(key, None)
    cfg.update(method=alg.loss, model=model, output_dir=str(out), max_steps=alg.steps_per_round)
    if alg.loss == "dpo":
        cfg["rpo_alpha"] = alg.rpo_alpha
    cfg["data"] = {**cfg["data"], "train": str(pairs_file), "eval": None, "eval_size": 0}
    if alg.loss not in ("simpo", "orpo"):
        cfg["beta"] = alg.beta
        cfg["reference"] = {**cfg["reference"], "model": config.model if alg.reference_update == "initial" else None}
    return cfg


def round_prompts(prompts: list[PromptRecord], k: int | None, seed: int, round_number: int) -> list[PromptRecord]:
    """Round ``round_number``'s prompts: all of them, or ``k`` drawn without replacement from a generator
    seeded by (seed, round), so that every round sees fresh prompts and a rerun sees the same ones."""
    if k is None or k >= len(prompts):
        return prompts
    g = torch.Generator().manual_seed(seed * 1_000_003 + round_number)
    return [prompts[i] for i in sorted(torch.randperm(len(prompts), generator=g)[:k].tolist())]


def run_iterative(
    config: TrainConfig, resume: bool = False, generator_factory: Callable[[nn.Module, Any], Generator] | None = None
) -> RunResult:
    alg = config.algorithm
    assert isinstance(alg, IterativeDPO)
    determinism.configure(config.deterministic)  # first: before anything starts CUDA (and cuBLAS)
    with rundir.claim(Path(config.output_dir), resume) as folder:  # locked; its rounds are covered
        return _rounds(config, folder.path, generator_factory)


def _same_config(config: TrainConfig, output_dir: Path) -> None:
    """Write ``config.yaml``; a resumed run's must match it (refused in one line otherwise)."""
    saved = output_dir / "config.yaml"
    if saved.exists():
        check_resumable(yaml.safe_load(saved.read_text()) or {}, config.to_dict())
    else:
        rundir.write_config(output_dir, config)
    distributed.barrier()


def _saved_round(round_dir: Path) -> dict[str, Any] | None:
    """The figures of a round whose pairs were written (a resumed run reuses them), else None; a round folder
    without them (killed while sampling) is removed, so that the round samples again."""
    saved = round_dir / "round.json"
    if saved.exists():
        return dict(json.loads(saved.read_text()))
    if distributed.is_main() and round_dir.exists():
        shutil.rmtree(round_dir)
    distributed.barrier()
    return None


def _rounds(
    config: TrainConfig, output_dir: Path, generator_factory: Callable[[nn.Module, Any], Generator] | None
) -> RunResult:
    """The rounds, in a claimed folder (a failed or killed run's rounds were cleared: they start again)."""
    alg = config.algorithm
    assert isinstance(alg, IterativeDPO)
    reward_fn = method_rewards(config)
    tokenizer = load_tokenizer(config.model)
    renderer = Renderer(tokenizer, config.data.chat_template)
    all_prompts, _ = load_prompts(config.data.train, config.data.split, renderer, config.data.prompt_limit)
    reward_fn.check_columns(config.data.train, all_prompts)
    eval_prompts = []
    if config.data.eval:
        eval_prompts = load_prompts(config.data.eval, config.data.split, renderer, config.data.prompt_limit)[0]
        reward_fn.check_columns(config.data.eval, eval_prompts)
    make_generator = generator_factory or default_generator(config)
    gen = config.generation
    params = SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k, gen.stop)
    device = distributed.device()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model, rounds, result = config.model, [], None
    log = tqdm.write if distributed.is_main() else lambda _: None
    _same_config(config, output_dir)
    for r in range(1, alg.rounds + 1):
        round_dir = output_dir / f"round-{r}"
        pairs_file = round_dir / "pairs.jsonl"
        info, shared = _saved_round(round_dir), None
        if info is None:
            policy = load_causal_lm(model, trainable=False)
            # Round 1 samples the starting model: the same round for every run with its key (the frontier's),
            # whose weights are digested here on the host, before they move to the device.
            shared = first_round.name_of(config, policy, [*all_prompts, *eval_prompts]) if r == 1 else None
            info = first_round.reuse(shared, round_dir, log) if shared else None
            if info is None:
                policy = policy.to(device)
            else:
                del policy
        if info is None:
            # 1. Sample N answers per prompt from the current model and score them.
            prompts = round_prompts(all_prompts, alg.prompts_per_round, config.seed, r)
            generator = make_generator(policy, tokenizer)
            heldout = heldout_figures(generator, reward_fn, eval_prompts, config, pad_id) if eval_prompts else {}
            n = alg.num_generations
            # The online methods' sampler: each process samples and scores its share, the shares gathered.
            samples = sample_all(generator, reward_fn, prompts, n, params, config.seed + r, pad_id, False)
            texts, scores = samples.texts, samples.rewards.tolist()
            del generator, policy, samples
            # 2. Best against worst (the k best against the k worst); ties dropped. Saved as a preference data
            # set (reusable offline).
            # A pair whose texts are empty or decode identically carries no preference the data checks accept.
            pairs = [
                p for p in best_worst_pairs(scores, n, alg.tie_threshold, alg.pairs_per_prompt)
                if texts[p.chosen].strip() and texts[p.rejected].strip() and texts[p.chosen] != texts[p.rejected]
            ]  # fmt: skip
            info = {"round": r, "pairs": len(pairs), "prompts": len(prompts), "reward_mean": sum(scores) / len(scores)}
            if heldout:
                info["heldout_at_start"] = heldout
            if distributed.is_main():  # every process holds the same pairs: the first one writes them
                round_dir.mkdir(parents=True)
                with pairs_file.open("w", encoding="utf-8") as f:
                    for pair in pairs:
                        row = {"prompt": prompts[pair.prompt_index].prompt, "chosen": texts[pair.chosen],
                               "rejected": texts[pair.rejected], "score_chosen": scores[pair.chosen],
                               "score_rejected": scores[pair.rejected],
                               "margin": pair.margin}  # fmt: skip
                        f.write(json.dumps(row) + "\n")
                tmp = round_dir / ".round.json.tmp"
                tmp.write_text(json.dumps(info, indent=1))
                tmp.replace(round_dir / "round.json")  # last: a round with round.json has all its pairs
                if shared:
                    first_round.keep(shared, round_dir, log)
            distributed.barrier()
        log(f"round {r}: mean reward {info['reward_mean']:.3f}, {info['pairs']} pairs from {info['prompts']} prompts")
        rounds.append(info)
        if info["pairs"] < config.batch_size:
            log(f"round {r}: fewer pairs than batch_size ({config.batch_size}); stopping")
            break
        # 3. Train the DPO-family loss on them: the offline loop, as `posttrain train` would (a finished
        # round's run is kept; a killed one resumes from its last checkpoint or starts again).
        train_dir = round_dir / "train"
        result = RunResult.read_back(train_dir)
        if result is None and stopping.agreed():  # SIGTERM while the round sampled
            raise stopping.Stopped(f"stopped by {stopping.Stopped.signal()} once round {r} had sampled its pairs "
                                   f"({pairs_file}); --resume trains on them")  # fmt: skip
        offline = round_config(config, pairs_file, model, train_dir)
        result = result or run(offline, resume=train_dir.exists())
        if config.keep_resumable is not None and distributed.is_main():
            checkpoint.slim(train_dir, 0)  # a finished round is never resumed: its checkpoints stay as models
        model = str(result.model_dir)
    if result is None:
        raise ConfigError("iterative_dpo: no round produced enough pairs to train; raise num_generations or rounds")
    if distributed.is_main():
        if (output_dir / "model").exists():  # a resumed run killed while it copied
            shutil.rmtree(output_dir / "model")
        shutil.copytree(result.model_dir, output_dir / "model", copy_function=checkpoint.link_or_copy)
    distributed.barrier()
    summary: dict[str, Any] = {"method": alg.name, "model": config.model, "rounds": rounds}
    if eval_prompts:  # greedy answers to the held-out prompts, before the first round and after the last
        summary["heldout_before"] = rounds[0]["heldout_at_start"]
        final = load_causal_lm(str(output_dir / "model"), trainable=False).to(device)
        summary["heldout_after"] = heldout_figures(make_generator(final, tokenizer), reward_fn, eval_prompts,
                                                   config, pad_id)  # fmt: skip
    summary.update(memory.peak_memory(device))  # over every round (peaks of the process)
    if distributed.is_main():
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_card(output_dir / "model", config, summary)  # the last round's card replaced by the run's
    return RunResult(output_dir, output_dir / "model", result.metrics_path, result.steps, summary)
