"""PPO's critic: per-token values ``V(s_t)``, aligned with the log-probs of :mod:`posttrain.model.logps`.

Token ``t``'s log-prob is read from the hidden state at ``t - 1`` (the state that generated it), so its value
is read there too: ``values[b, t] = head(hidden[b, t - 1])`` for completion tokens, 0 elsewhere. GAE then
sees one value per generated token, as :func:`posttrain.rollout.advantages.gae` expects.

Two layouts. A separate critic is a one-output ``AutoModelForSequenceClassification`` (trunk + ``score``
head), so a reward model trained by ``method: reward`` is a critic as it is (InstructGPT initialises the
value function from the reward model), and a saved critic reloads with plain transformers. A shared critic is
a ``Linear(hidden, 1)`` on the policy's own trunk: one model less, and the value loss shapes the trunk too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from posttrain.model.load import load_reward_model
from posttrain.model.masks import causal_padding_mask


def _shift(head_values: Tensor, loss_mask: Tensor) -> Tensor:
    """(B, T) values of the states at t - 1 moved to position t, 0 off ``loss_mask``."""
    values = torch.zeros(loss_mask.shape, dtype=head_values.dtype, device=head_values.device)
    values[:, 1:] = head_values[:, :-1]
    return torch.where(loss_mask.to(torch.bool), values, 0.0)


class SeparateCritic(nn.Module):
    """A sequence classifier used per token: its trunk's hidden states through its ``score`` head."""

    def __init__(self, model: nn.Module, *, new_head: bool = False) -> None:
        super().__init__()
        self.model = model
        self.new_head = new_head  # its score head was made here (started at zero), not loaded

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
        model: Any = self.model
        trunk = getattr(model, model.base_model_prefix)
        mask = causal_padding_mask(model, attention_mask)  # (prepared: no device read)
        hidden = trunk(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        head_values = model.score(hidden).squeeze(-1).float()  # (B, T)
        return _shift(head_values, loss_mask)

    def save(self, directory: Path, tokenizer: Any) -> None:
        model: Any = self.model
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)


class SharedCritic(nn.Module):
    """A value head on the policy's trunk; it reads the hidden states the policy's forward returns."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # values start at 0: no random baseline in the first advantages
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: Tensor, loss_mask: Tensor) -> Tensor:
        return _shift(self.head(hidden).squeeze(-1).float(), loss_mask)

    def save(self, directory: Path, tokenizer: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(directory / "value_head.safetensors"))  # fmt: skip


def load_critic(name: str, tokenizer: Any, *, gradient_checkpointing: bool = False) -> SeparateCritic:
    """A separate critic from a reward model (loaded as is) or a causal LM (its trunk, a new value head).

    A new head starts at zero, as the shared one does: transformers initialises it at random, and on
    SmolLM2-135M that gave values of ~0.7 +- the reward's own spread, an explained variance of -2 that took a
    sentiment PPO run ~45 rollouts to climb above 0 while its advantages were mostly the head's noise
    (docs/main_job.md). At zero the first advantages are the returns themselves (whitened), and the
    head's gradient, hidden state x error, is not zero, so the critic learns from the first step.
    """
    model: Any = load_reward_model(name, tokenizer, gradient_checkpointing=gradient_checkpointing)
    new_head = not any(arch.endswith("ForSequenceClassification") for arch in model.config.architectures or ())
    if new_head:  # a causal LM's config: the score head is new
        with torch.no_grad():
            for param in model.score.parameters():
                param.zero_()
    return SeparateCritic(model, new_head=new_head)


def critic_source(critic_model: str | None, rewards: tuple[Any, ...], model: str) -> str:
    """Where the critic starts: ``critic_model``, else the path of a ``reward_model`` reward, else the policy.

    >>> critic_source(None, ({"name": "reward_model", "path": "runs/rm/model"},), "base")
    'runs/rm/model'
    >>> critic_source(None, ("numeric_answer",), "base"), critic_source("c", (), "base")
    ('base', 'c')
    """
    if critic_model:
        return critic_model
    for spec in rewards:
        if isinstance(spec, dict) and spec.get("name") == "reward_model" and spec.get("path"):
            return str(spec["path"])
    return model
