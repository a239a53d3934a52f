"""``posttrain eval``: a trained model against its reference on held-out data, without training.

Given a run directory (its ``config.yaml`` and ``model/``) or a config file, it scores the eval split with
the run's own task and loss: for preference data the method's loss, reward accuracy and margins, and the
summed chosen/rejected log-probs of the policy and of the reference (the run's starting model, or
``reference.model``), plus the policy's own chosen-over-rejected margin and preference share.

For an online run (prompts) it generates instead: ``samples`` completions per held-out prompt from the
policy and from the reference, scored by the run's rewards: the policy's win rate against the reference,
reward and length distributions of both, and KL(policy || reference) estimated on the policy's samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError, TrainConfig, load
from posttrain.data.prompts import load_prompts
from posttrain.data.tokenize import Renderer
from posttrain.model.load import load_causal_lm, load_tokenizer, local_model_problem, remote_code
from posttrain.rollout.compare import distribution, sampled_kl, win_rate
from posttrain.rollout.generate import SamplingParams
from posttrain.training.offline import evaluate
from posttrain.training.rollouts import Scorer, default_generator, method_rewards, policy_and_reference_logps, sample
from posttrain.training.tasks import task_for


def evaluate_run(
    source: str, model: str | None = None, data: str | None = None, samples: int = 4, temperature: float | None = None
) -> dict[str, Any]:
    """Figures of ``model`` (default: the run's ``model/``) on ``data`` (default: the config's eval data).
    ``samples`` and ``temperature`` (default: the run's ``generation.temperature``) apply to online runs."""
    path = Path(source)
    run_dir = path if path.is_dir() else None
    config_path = path / "config.yaml" if run_dir else path
    config = load(config_path)
    with remote_code(config.trust_remote_code):  # every model load honours the run's key
        return _evaluate(config, run_dir, model, data, samples, temperature)


def _evaluate(
    config: TrainConfig, run_dir: Path | None, model: str | None, data: str | None, samples: int,
    temperature: float | None,
) -> dict[str, Any]:  # fmt: skip
    if model is not None and local_model_problem(model):
        raise ConfigError(f"--model: {local_model_problem(model)}")
    if model is None:
        model = str(run_dir / "model") if run_dir else config.model
    if not Path(model).exists() and run_dir:
        raise ConfigError(f"{model}: no trained model in the run directory")
    source_data = data or config.data.eval
    if not source_data:
        raise ConfigError("data.eval: the config has no eval data; pass --data FILE")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.algorithm.data_kind == "prompts":
        return compare_generations(config, model, source_data, device, samples, temperature)
    tokenizer = load_tokenizer(model)
    task = task_for(config, tokenizer, device)
    records, _ = task.load_records(source_data, config.data.split)
    policy = task.load_model(model, trainable=False).to(device)
    task.choose_layout(policy)
    # resumed=True: the reference is loaded from the starting model (or reference.model), not the policy.
    task.prepare_references(policy, {"eval": records}, resumed=True)
    micro = config.micro_batch_size or config.batch_size
    figures = evaluate(task, policy, records, micro)
    return {"model": model, "data": source_data, "method": config.method, "rows": len(records), **figures}


def compare_generations(
    config: TrainConfig, model: str, data: str, device: torch.device, samples: int, temperature: float | None
) -> dict[str, Any]:
    """``samples`` completions per prompt of ``data`` from ``model`` and from the reference (``reference.model``
    or the run's starting model), with the run's sampling settings and seed, scored by the run's rewards."""
    if samples < 1:
        raise ConfigError(f"--samples: must be >= 1, got {samples}")
    gen = config.generation
    temp = gen.temperature if temperature is None else temperature
    if not (math.isfinite(temp) and temp >= 0):
        raise ConfigError(f"--temperature: must be a finite number >= 0, got {temp}")
    reward_fn = method_rewards(config)
    tokenizer = load_tokenizer(model)
    renderer = Renderer(tokenizer, config.data.chat_template)
    prompts, _ = load_prompts(data, config.data.split, renderer, config.data.prompt_limit)
    reward_fn.check_columns(data, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = SamplingParams(gen.max_new_tokens, temp, gen.top_p, gen.top_k, gen.stop)
    policy = load_causal_lm(model, trainable=False).to(device)
    reference = load_causal_lm(config.reference.model or config.model, trainable=False).to(device)
    make = default_generator(config)
    drawn = {name: sample(make(m, tokenizer), reward_fn, prompts, samples, params, config.seed, pad_id, False)
             for name, m in (("policy", policy), ("reference", reference))}  # fmt: skip
    out: dict[str, Any] = {"model": model, "data": data, "method": config.method, "prompts": len(prompts),
                           "samples_per_prompt": samples, "temperature": temp}  # fmt: skip
    out.update(win_rate(drawn["policy"].rewards.tolist(), drawn["reference"].rewards.tolist()))
    for name, s in drawn.items():
        out[name] = {"reward": distribution(s.rewards.tolist()), "completion_length": distribution(s.lengths.tolist()),
                     "truncated": float(s.truncated.double().mean()),
                     **{f"reward/{k}": float(v.mean()) for k, v in s.per_reward.items()}}  # fmt: skip
    if temp > 0:  # a KL estimate needs samples from the policy's own (tempered) distribution
        s = drawn["policy"]
        pol, ref = policy_and_reference_logps(Scorer(config, device, temperature=temp), policy, reference, s)
        out.update(sampled_kl(pol, ref, s.loss_mask))
    return out
