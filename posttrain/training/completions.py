"""completions.jsonl: what the policy wrote while it trained (online methods; config key ``log_completions``).

Each optimizer step writes its rollout's first ``log_completions`` samples (a whole group for GRPO with
``num_generations`` up to that number), one JSON line each::

    {"step": 3, "sample": 0, "prompt": "...", "completion": "...", "reward": 1.0,
     "rewards": {"regex_format": 1.0}, "advantage": 0.87, "length": 3, "truncated": false}

``advantage`` is the sample's advantage (PPO's: the mean of its tokens' advantages). It reaches the host
in the step's one device read (:meth:`CompletionsLog.on_device`); the texts and rewards are host tensors.
Texts are cut at :data:`TEXT_LIMIT` characters, so the file grows by at most a few KB per step. A resumed
run drops the lines after its checkpoint, as metrics.jsonl does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain import distributed
from posttrain.data.prompts import PromptRecord
from posttrain.host import host_values
from posttrain.training.metrics import MetricsWriter
from posttrain.training.rollouts import Samples

TEXT_LIMIT = 2000
"""Characters kept of a prompt or a completion."""
PREFIX = "_sample_advantage/"
"""The names under which the sampled rows' advantages travel with the step's figures (removed by ``write``)."""


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + " [...]"


class CompletionsLog:
    """Writes ``per_step`` samples of each step's rollout to ``path`` (first process only; 0: nothing).

    ``start``: the checkpoint step a run resumes from; lines after it are dropped."""

    def __init__(self, path: Path, per_step: int, tokenizer: Any, start: int = 0) -> None:
        self.path, self.per_step, self.tokenizer = path, per_step, tokenizer
        if start:
            MetricsWriter(path).keep_until(start)  # (the same truncation as metrics.jsonl's)

    def on_device(self, advantages: Tensor, loss_mask: Tensor) -> dict[str, Tensor]:
        """The sampled rows' advantages as scalars, to be read with the step's figures: ``advantages`` (N,),
        or (N, T) per token (PPO), then averaged over each completion's tokens."""
        rows = min(self.per_step, advantages.shape[0])
        if not rows:
            return {}
        adv = advantages[:rows].double()
        if adv.dim() == 2:
            mask = loss_mask[:rows].to(adv.device, torch.float64)
            adv = (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return {f"{PREFIX}{i}": adv[i] for i in range(rows)}

    def write(self, step: int, s: Samples, prompts: Sequence[PromptRecord], figures: dict[str, Any]) -> None:
        """Append the sampled rows of step ``step``, and take their advantages out of ``figures``. ``prompts``:
        the step's batch (a row whose prompt is not found there, after DAPO's resampling, is decoded)."""
        advantages = {int(k[len(PREFIX) :]): figures.pop(k) for k in list(figures) if k.startswith(PREFIX)}
        rows = min(self.per_step, len(s.rewards))
        if not rows or not distributed.is_main():
            return
        texts = {tuple(p.prompt_ids): p.text for p in prompts}
        rewards = host_values(s.rewards[:rows])
        per_reward = {name: host_values(values[:rows]) for name, values in s.per_reward.items()}
        lengths = [int(n) for n in host_values(s.lengths[:rows])]
        truncated = host_values(s.truncated[:rows])
        with self.path.open("a", encoding="utf-8") as f:
            for i in range(rows):
                ids = host_values(s.input_ids[i])
                end = sum(host_values(s.attention_mask[i]))  # right-padded: the row's tokens come first
                prompt_ids, completion_ids = ids[: end - lengths[i]], ids[end - lengths[i] : end]
                prompt = texts.get(tuple(prompt_ids))
                if prompt is None:
                    prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
                record = {
                    "step": step, "sample": i, "prompt": _cut(prompt),
                    "completion": _cut(self.tokenizer.decode(completion_ids, skip_special_tokens=True)),
                    "reward": rewards[i], "rewards": {name: v[i] for name, v in per_reward.items()},
                    "advantage": advantages.get(i), "length": lengths[i], "truncated": bool(truncated[i]),
                }  # fmt: skip
                f.write(json.dumps(record) + "\n")
