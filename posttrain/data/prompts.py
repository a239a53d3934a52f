"""Prompts for the online methods: a ``prompt`` (text or conversation) and any other columns, which are
handed to the reward functions (e.g. ``answer`` for a verifier)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.examples import Conversation
from posttrain.data.formats import DataError, _Row, read_rows
from posttrain.data.tokenize import Renderer, TruncationStats


@dataclass(frozen=True)
class PromptRecord:
    """A tokenized prompt. ``text`` is what reward functions see (a conversation's last user turn)."""

    prompt_ids: tuple[int, ...]
    text: str
    index: int
    columns: dict[str, Any] = field(default_factory=dict)
    prompt: str | Conversation = ""
    """The prompt as read (text or conversation), e.g. to write it into generated preference pairs."""
    row: int = 0
    """Its row in the data file (from 1), for errors that name it."""


def load_prompts(
    source: str, split: str, renderer: Renderer, max_prompt_length: int
) -> tuple[list[PromptRecord], TruncationStats]:
    """Read, validate and tokenize every prompt; long prompts keep their end (counted in the stats)."""
    stats = TruncationStats()
    records: list[PromptRecord] = []
    for number, row in read_rows(source, split):
        r = _Row(source, number, row)
        prompt: str | Conversation = r.text_or_messages("prompt")
        if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
            raise r.fail("prompt", "must not end with the assistant (the completion is the assistant's turn)")
        try:
            ids = renderer.prompt_ids(prompt)
        except ValueError as err:
            raise DataError(f"{source}: row {number}: {err}") from None
        stats.rows += 1
        if len(ids) > max_prompt_length:
            ids = ids[len(ids) - max_prompt_length :]
            stats.prompt_cut += 1
        text = (
            prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")
        )
        columns = {k: v for k, v in r.row.items() if k != "prompt"}
        records.append(PromptRecord(tuple(ids), text, len(records), columns, prompt, number))
    if not records:
        raise DataError(f"{source}: no rows")
    return records, stats


def repeat_columns(records: Sequence[PromptRecord], n: int) -> dict[str, list[Any]]:
    """Each column of ``records`` as a list with every value repeated ``n`` times (prompt-major)."""
    names = sorted({k for r in records for k in r.columns})
    return {k: [r.columns.get(k) for r in records for _ in range(n)] for k in names}


def validate_prompts(source: str, split: str = "train") -> list[dict[str, Any]]:
    """The row checks of :func:`load_prompts` without a tokenizer (``posttrain data validate``, pipelines)."""
    rows = []
    for number, row in read_rows(source, split):
        r = _Row(source, number, row)
        prompt = r.text_or_messages("prompt")
        if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
            raise r.fail("prompt", "must not end with the assistant (the completion is the assistant's turn)")
        rows.append(r.row)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows
