"""The points of a frontier: models along each run's path, each measured on the held-out prompts.

A point is a model (a checkpoint, a round's model or the final model) and what its samples show: the mean
reward, KL(policy || reference) in nats per completion, distinct-2 and the completion length, all measured
on the same samples: ``samples`` completions per held-out prompt at temperature 1, top_p 1, top_k 0 (the
policy's own distribution, as the DPO paper's Fig. 2 plots it) with one seed for every point.

KL per completion is the mean over samples of ``sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)``
(the k1 estimator on the policy's samples: unbiased for the sequence-level KL; Schulman 2020,
"Approximating KL Divergence"). The starting model is the point at KL 0 of every curve.

A measured point is written to ``OUTPUT_DIR/frontier/points/RUN/STEP.json`` with the model's fingerprint
(size and modification time of its weights, not its path: a moved grid keeps its points) and the settings,
and reused while both are unchanged. It records the machine that measured it (:mod:`posttrain.machine`): another
machine samples other completions from the same model and seed. Beside them, ``RUN/run.json`` keeps the run's
config and the points its curve shows, so that a run whose folder was removed (to free the disk) keeps its curve
in the table while its config and the settings stay as they were (:func:`kept_points`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import TrainConfig
from posttrain.data.prompts import PromptRecord, load_prompts
from posttrain.data.tokenize import Renderer
from posttrain.frontier.grid import FrontierSettings
from posttrain.machine import describe
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.rollout.compare import distinct_n, sequence_log_ratio
from posttrain.rollout.generate import SamplingParams
from posttrain.training import checkpoint
from posttrain.training.rollouts import Scorer, default_generator, method_rewards, policy_and_reference_logps, sample

ROUND_DIR = re.compile(r"round-(\d+)")


@dataclass(frozen=True)
class Point:
    """A model along a run's path: ``step`` counts optimizer steps from the start (across rounds)."""

    step: int
    model: Path


def _steps_of(run: Path, offset: int) -> tuple[list[Point], int]:
    """The checkpoints and final model of one training folder, steps shifted by ``offset``; and its last step."""
    points = []
    for step, folder in checkpoint.saved(run):
        if (folder / "config.json").is_file():
            points.append(Point(offset + step, folder))
    last = max((p.step for p in points), default=offset)
    summary = run / "summary.json"
    if (run / "model" / "config.json").is_file():
        steps = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
        final = offset + int(steps) if isinstance(steps, int) else last + 1
        points = [p for p in points if p.step != final] + [Point(final, run / "model")]
        last = final
    return sorted(points, key=lambda p: p.step), last


def path_points(run: Path) -> list[Point]:
    """Every model along a finished run's path, in order: its checkpoints and final model; for an iterative
    run the checkpoints and model of each round's training, steps counted across the rounds."""
    rounds = sorted((int(m.group(1)), d) for d in run.iterdir() if (m := ROUND_DIR.fullmatch(d.name))) \
        if run.is_dir() else []  # fmt: skip
    if not rounds:
        return _steps_of(run, 0)[0]
    points: list[Point] = []
    offset = 0
    for _, folder in rounds:
        found, offset = _steps_of(folder / "train", offset)
        points.extend(found)
    return points


def point_settings(config: TrainConfig, settings: FrontierSettings, eval_data: str) -> dict[str, Any]:
    """Everything that changes what a point's samples are or how they are scored, as JSON reads it back:
    ``config`` is :func:`posttrain.frontier.grid.point_config`'s (its ``generation``, ``batch_size`` included,
    draws every point)."""
    s, c = settings, config
    key = {"data": eval_data, "samples": s.samples, "seed": s.seed, "generation": c.generation,
           "chat_template": c.data.chat_template, "split": c.data.split, "prompt_limit": c.data.prompt_limit,
           "precision": c.precision, "rewards": c.rewards, "reference": c.reference.model or c.model}  # fmt: skip
    return dict(json.loads(json.dumps(key, default=lambda o: dataclasses.asdict(o))))


RUN_RECORD = "run.json"


def _run_key(config: TrainConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """What a run's measured curve depends on, as JSON reads it back: its training config (its folder aside: a
    moved grid is the same run) and the point settings (:meth:`PointMeter.settings_key`)."""
    trained = {k: v for k, v in config.to_dict().items() if k != "output_dir"}
    return dict(json.loads(json.dumps({"config": trained, "settings": settings}, default=str)))


def keep_record(folder: Path, config: TrainConfig, settings: dict[str, Any], points: list[dict[str, Any]]) -> None:
    """Write ``folder/run.json`` (``folder``: the run's point cache): the curve ``points`` and what it depends on."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps({"key": _run_key(config, settings), "points": points}, indent=1) + "\n")
    tmp.replace(folder / RUN_RECORD)


def kept_points(folder: Path, config: TrainConfig, settings: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The points :func:`keep_record` kept for a run of this config measured under these settings, or None
    (none kept, or kept for another config or other settings: an edited run is trained and measured again)."""
    record = folder / RUN_RECORD
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    return list(saved["points"]) if saved.get("key") == _run_key(config, settings) else None


def spread(points: list[Point], count: int) -> list[Point]:
    """``count`` points spread evenly by step along the path: for each of the steps ``last * i / count``
    (i = 1..count) the nearest model not yet taken, the final model always in (all of them when fewer).

    >>> [p.step for p in spread([Point(s, Path(".")) for s in range(1, 11)], 3)]
    [3, 7, 10]
    >>> [p.step for p in spread([Point(s, Path(".")) for s in (10, 20, 30, 32)], 3)]
    [10, 20, 32]
    """
    if len(points) <= count:
        return points
    last = points[-1].step
    left, chosen = list(points), []
    for i in range(count, 0, -1):  # from the end: the final model first, ties go to the later model
        target = last * i / count
        best = min(reversed(left), key=lambda p: abs(p.step - target))
        left.remove(best)
        chosen.append(best)
    return sorted(chosen, key=lambda p: p.step)


def fingerprint(model: Path) -> str:
    """Size and modification time of a model folder's weight files: a retrained model is measured again. A
    checkpoint's training state is not the model (slimming it away, ``keep_resumable``, keeps the points)."""
    weights = [f for f in model.glob("*.safetensors") if f.name != checkpoint.TENSORS_FILE]
    files = sorted(weights) or sorted(model.glob("*.bin"))
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


class PointMeter:
    """Measures models on the held-out prompts, all against one reference, with one sampling seed.

    The reference (the grid's starting model), the prompts, the rewards and the generator are loaded once."""

    def __init__(self, config: TrainConfig, settings: FrontierSettings, eval_data: str) -> None:
        self.config, self.settings, self.eval_data = config, settings, eval_data
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(config.model)
        renderer = Renderer(self.tokenizer, config.data.chat_template)
        self.prompts: list[PromptRecord] = load_prompts(eval_data, config.data.split, renderer,
                                                        config.data.prompt_limit)[0]  # fmt: skip
        self.reward_fn = method_rewards(config)
        self.reward_fn.check_columns(eval_data, self.prompts)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.params = SamplingParams(config.generation.max_new_tokens, 1.0, 1.0, 0, config.generation.stop)
        self.make_generator = default_generator(config)
        self.reference = load_causal_lm(config.reference.model or config.model, trainable=False).to(self.device)
        self.scorer = Scorer(config, self.device, temperature=1.0)

    def settings_key(self) -> dict[str, Any]:
        """Everything that changes what a point's samples are or how they are scored (:func:`point_settings`)."""
        return point_settings(self.config, self.settings, self.eval_data)

    def measure(self, model: Path | None, cache: Path | None = None) -> dict[str, Any]:
        """The figures of ``model`` (None: the reference itself, the point at KL 0), reused from ``cache``
        when it holds this model's figures under these settings."""
        # The model by its folder's name and its weights' fingerprint, not its path: the cache sits in the run's
        # own folder, so a moved grid (mv runs/a runs/b) keeps its points.
        key = {"model": model.name if model else None, "fingerprint": fingerprint(model) if model else None,
               "settings": self.settings_key()}  # fmt: skip
        self.reused = False
        if cache is not None and cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                self.reused = True
                return dict(saved["figures"])
        figures = self._measure(model)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp")
            tmp.write_text(json.dumps({"key": key, "figures": figures}, indent=1) + "\n")
            tmp.replace(cache)
        return figures

    def _measure(self, model: Path | None) -> dict[str, Any]:
        policy = self.reference if model is None else load_causal_lm(str(model), trainable=False).to(self.device)
        generator = self.make_generator(policy, self.tokenizer)
        s = sample(generator, self.reward_fn, self.prompts, self.settings.samples, self.params, self.settings.seed,
                   self.pad_id, False)  # fmt: skip
        n = len(s.rewards)
        kl = torch.zeros(n, dtype=torch.float64)
        if model is not None:
            pol, ref = policy_and_reference_logps(self.scorer, policy, self.reference, s)
            kl = sequence_log_ratio(pol, ref, s.loss_mask)
        completions = list(s.texts)  # what the rewards scored
        per_prompt = [p for p in self.prompts for _ in range(self.settings.samples)]
        rewards = s.rewards.tolist()
        shown = [{"prompt": p.text, "completion": c, "reward": round(float(r), 4)}
                 for p, c, r in zip(per_prompt, completions, rewards, strict=True)]  # fmt: skip
        return {
            "reward": float(s.rewards.mean()), "reward_se": _se(s.rewards),
            "kl": float(kl.mean()), "kl_se": _se(kl),
            "distinct_2": distinct_n(completions, 2), "completion_length": float(s.lengths.mean()),
            "samples": n, "shown": shown, "machine": describe(self.device),
        }  # fmt: skip


def _se(values: torch.Tensor) -> float:
    """The standard error of a mean (0 for a single value)."""
    n = len(values)
    return float(values.double().std() / math.sqrt(n)) if n > 1 else 0.0
