"""A trained reward model as a reward function: ``(prompts, completions, **columns) -> list[float]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.data.examples import Conversation
from posttrain.data.tokenize import Renderer, TruncationStats, truncate
from posttrain.model.load import pretrained


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a saved one-output ``AutoModelForSequenceClassification``.

    Each pair is rendered exactly as ``method: reward`` rendered it in training (the tokenizer's chat
    template as a user turn and an assistant turn when it has one, ``chat_template`` deciding as
    ``data.chat_template`` does; otherwise BOS + prompt + completion + EOS), right-padded with the
    model's ``pad_token_id`` and scored ``batch_size`` rows at a time; the score is the model's own
    output at the last real token. ``max_length`` / ``max_prompt_length``: the training run's truncation
    (None: no truncation). Extra keyword columns are accepted and ignored, as the reward signature asks.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        *,
        chat_template: bool | None = None,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = pretrained(AutoTokenizer, path, "reward_model: path")
        model = pretrained(AutoModelForSequenceClassification, path, "reward_model: path", dtype=torch.float32)
        if model.config.num_labels != 1:
            raise ValueError(f"{path}: a reward model has one output, this classifier has {model.config.num_labels}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.pad_id: int | None = model.config.get_text_config().pad_token_id
        # Without a pad id transformers scores the last position, so every row must be alone in its batch.
        self.batch_size = batch_size if self.pad_id is not None else 1
        self.renderer = Renderer(self.tokenizer, chat_template)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else (max_length or 0) // 2

    def ids(self, prompt: str | Conversation, completion: str | Conversation) -> list[int]:
        """The token ids of prompt + completion, as training tokenized (and truncated) them."""
        prompt_ids = self.renderer.prompt_ids(prompt)
        completion_ids = self.renderer.completion_ids(prompt, completion)
        if self.max_length is not None:
            kept = truncate(prompt_ids, [completion_ids], self.max_length, self.max_prompt_length, TruncationStats())
            if kept is not None:
                return list(kept[0] + kept[1][0])
        return prompt_ids + completion_ids

    def __call__(
        self, prompts: Sequence[str | Conversation], completions: Sequence[str | Conversation], **columns: Any
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        rows = [self.ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                width = max(len(r) for r in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id or 0, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, r in enumerate(chunk):
                    input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                    attention_mask[i, : len(r)] = 1
                out = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False
                )
                scores.extend(out.logits.squeeze(-1).float().tolist())
        return scores
