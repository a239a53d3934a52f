"""Examples -> token ids, once per run: chat template, separate prompt/completion ids, truncation.

With a chat template (used when the tokenizer has one, unless ``data.chat_template: false``), string rows
become a user turn and an assistant turn. The prompt is rendered with the generation prompt, the whole
conversation without it, and the completion is the text that the full rendering adds after the prompt's.
Both texts are tokenized with ``add_special_tokens=False``: a template that writes BOS itself (Llama
style) then gets exactly one BOS, not two. Without a template the prompt gets the tokenizer's BOS (if it
adds one) and each completion ends with EOS.

Truncation policy: a prompt longer than ``max_prompt_length`` keeps its last tokens (the part next to the
answer); then a completion longer than ``max_length - len(prompt)`` keeps its first tokens. A pair is
dropped only when a completion would keep no token. Counts of cut and dropped rows are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.data.examples import Conversation, PreferenceExample, PreferenceRecord
from posttrain.data.formats import DataError
from posttrain.errors import ConfigError


@dataclass
class TruncationStats:
    """How many rows truncation touched: prompts cut (kept their end), completions cut, pairs dropped."""

    rows: int = 0
    prompt_cut: int = 0
    completion_cut: int = 0
    dropped: int = 0
    tied: int = 0
    """Pairs dropped because truncation left chosen and rejected identical (no preference left to learn)."""

    def summary(self) -> str:
        tied = f", {self.tied} dropped as chosen == rejected after the cut" if self.tied else ""
        return (
            f"{self.rows} rows: {self.prompt_cut} prompts cut to their end, {self.completion_cut} with a "
            f"completion cut, {self.dropped} dropped (a completion kept no token){tied}"
        )


class Renderer:
    """Turns examples into token ids with one tokenizer and one policy (template or plain text)."""

    def __init__(self, tokenizer: Any, chat_template: bool | None = None) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_template = has_template if chat_template is None else chat_template
        if self.use_template and not has_template:  # a config error: it must reach the CLI as one line
            raise ConfigError("data.chat_template: is true but the tokenizer has no chat template")
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos: list[int] = [bos] if bos is not None and probe and probe[0] == bos else []
        self.eos: list[int] = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _template(self, messages: Conversation, generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return str(text)

    def prompt_ids(self, prompt: str | Conversation) -> list[int]:
        if self.use_template:
            return self._encode(self._template(_as_messages(prompt, "user"), True))
        if not isinstance(prompt, str):
            raise ValueError("conversational data needs a tokenizer with a chat template")
        return self.bos + self._encode(prompt)

    def completion_ids(self, prompt: str | Conversation, completion: str | Conversation) -> list[int]:
        if self.use_template:
            messages = _as_messages(prompt, "user")
            head = self._template(messages, True)
            full = self._template(messages + _as_messages(completion, "assistant"), False)
            if not full.startswith(head):
                raise ValueError(
                    "the chat template renders the prompt differently once the answer follows; "
                    "set data.chat_template: false or use a template whose prompt is a prefix"
                )
            return self._encode(full[len(head) :])
        if not isinstance(completion, str):
            raise ValueError("conversational data needs a tokenizer with a chat template")
        return self._encode(completion) + self.eos

    def conversation_segments(self, messages: Conversation) -> list[tuple[list[int], bool]]:
        """Token ids of a whole conversation as (ids, is_assistant_turn) segments, in order.

        Each assistant turn is the text the template adds when that turn is appended to the conversation
        rendered up to it with the generation prompt, so the segments concatenate to the template's full
        rendering and the assistant segments are exactly the assistant's tokens (end-of-turn included).
        """
        if not self.use_template:
            raise ValueError("conversational data needs a tokenizer with a chat template")
        segments: list[tuple[list[int], bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self._template(messages[:i], True) if i else ""
            full = self._template(messages[: i + 1], False)
            if not head.startswith(done) or not full.startswith(head):
                raise ValueError("the chat template renders earlier turns differently once later turns follow")
            if head[len(done) :]:
                segments.append((self._encode(head[len(done) :]), False))
            segments.append((self._encode(full[len(head) :]), True))
            done = full
        rest = self._template(messages, False)[len(done) :]
        if rest:
            segments.append((self._encode(rest), False))
        return segments


def _as_messages(value: str | Conversation, role: str) -> Conversation:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def truncate(
    prompt: Sequence[int],
    completions: Sequence[Sequence[int]],
    max_length: int,
    max_prompt_length: int,
    stats: TruncationStats,
) -> tuple[tuple[int, ...], list[tuple[int, ...]]] | None:
    """Apply the truncation policy to one prompt and its completions; None when the row must be dropped."""
    stats.rows += 1
    if len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]
        stats.prompt_cut += 1
    room = max_length - len(prompt)
    if any(len(c) > room for c in completions):
        stats.completion_cut += 1
    cut = [tuple(c[:room]) for c in completions]
    if any(len(c) == 0 for c in cut):
        stats.dropped += 1
        return None
    if len(cut) > 1 and all(c == cut[0] for c in cut[1:]):
        stats.tied += 1  # e.g. two answers differing only past max_length: a constant loss, no gradient
        return None
    return tuple(prompt), cut


def tokenize_preferences(
    examples: Sequence[PreferenceExample],
    renderer: Renderer,
    max_length: int,
    max_prompt_length: int,
    source: str = "data",
) -> tuple[list[PreferenceRecord], TruncationStats]:
    """Tokenize every pair once; returns the records (indexed in order) and the truncation counts."""
    stats = TruncationStats()
    records: list[PreferenceRecord] = []
    for ex in examples:
        try:
            prompt = renderer.prompt_ids(ex.prompt)
            chosen = renderer.completion_ids(ex.prompt, ex.chosen)
            rejected = renderer.completion_ids(ex.prompt, ex.rejected)
        except ValueError as err:
            raise DataError(f"{source}: row {ex.row}: {err}") from None
        if not prompt:
            raise DataError(f"{source}: row {ex.row}: field 'prompt': tokenizes to no tokens")
        if chosen == rejected:  # e.g. a chat template that trims what tells them apart
            raise DataError(f"{source}: row {ex.row}: field 'rejected': the same tokens as 'chosen' once tokenized")
        kept = truncate(prompt, [chosen, rejected], max_length, max_prompt_length, stats)
        if kept is not None:
            p, (c, r) = kept
            records.append(PreferenceRecord(p, c, r, index=len(records), margin=ex.margin))
    if not records:
        raise DataError(f"{source}: every row was dropped by truncation; raise data.max_length")
    return records, stats
