"""Demonstrations for SFT: read, validate, tokenize once, lay out as batches.

Rows are either ``prompt`` + ``completion`` (strings, or a conversation and the assistant's reply) or a
whole conversation under ``messages`` (multi-turn; every assistant turn is trained on). A preference row
(``prompt`` + ``chosen``, no ``completion``) is read as a demonstration of its chosen answer. The loss mask
covers the assistant's tokens (the completion, end-of-turn included), or every token after the first with
``completion_only: false``. Truncation keeps the start of a sequence; a row left with no trained token is
dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.data.collate import pad_rows
from posttrain.data.examples import Conversation
from posttrain.data.formats import DataError, _Row, preference_example, read_rows
from posttrain.data.tokenize import Renderer, TruncationStats
from posttrain.packing import Spans


@dataclass(frozen=True)
class SFTExample:
    """A demonstration: a prompt and its completion, or a whole conversation (``prompt`` None)."""

    prompt: str | Conversation | None
    completion: str | Conversation
    row: int


@dataclass(frozen=True)
class SequenceRecord:
    """One tokenized sequence with its loss mask (True where the token is trained on)."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    index: int


@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded rows: ``input_ids``, ``attention_mask``, ``loss_mask`` (rows, T); ``index`` (B,) the
    records' positions. Packed batches also carry ``position_ids`` (rows, T), restarting at 0 for each
    sequence; then a row holds several records and ``attention_mask`` only marks real tokens."""

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    index: Tensor
    position_ids: Tensor | None = None
    spans: Spans | None = None
    """Packed rows scored with span attention: each record one block (see posttrain/model/spans.py)."""


def sft_example(source: str, number: int, row: Any) -> SFTExample:
    r = _Row(source, number, row)
    if "messages" in r.row and r.row["messages"] is not None:
        value = r.row["messages"]
        if not isinstance(value, list):
            raise r.fail("messages", f"expected a list of messages, got {type(value).__name__}")
        messages = r.messages("messages", value)
        if not any(m["role"] == "assistant" for m in messages):
            raise r.fail("messages", "has no assistant turn to train on")
        if messages[-1]["role"] != "assistant":
            raise r.fail(
                "messages", f"the conversation must end with the assistant, ends with {messages[-1]['role']!r}"
            )
        return SFTExample(prompt=None, completion=messages, row=number)
    if "completion" not in r.row and "chosen" in r.row:
        # A preference row (any of its shapes, implicit prompt included) trains on its chosen answer:
        # SFT on the preferred side before DPO on the same pairs.
        pair = preference_example(source, number, row)
        return SFTExample(prompt=pair.prompt, completion=pair.chosen, row=number)
    prompt = r.text_or_messages("prompt")
    field = "completion"
    completion = r.text_or_messages(field)
    if isinstance(completion, list) and completion[-1]["role"] != "assistant":
        raise r.fail(field, "the conversation must end with the assistant")
    return SFTExample(prompt=prompt, completion=completion, row=number)


def load_sft(source: str, split: str = "train") -> list[SFTExample]:
    examples = [sft_example(source, number, row) for number, row in read_rows(source, split)]
    if not examples:
        raise DataError(f"{source}: no rows")
    return examples


def tokenize_sft(
    examples: Sequence[SFTExample], renderer: Renderer, max_length: int, completion_only: bool, source: str = "data"
) -> tuple[list[SequenceRecord], TruncationStats]:
    stats = TruncationStats()
    records: list[SequenceRecord] = []
    for ex in examples:
        try:
            if ex.prompt is None:
                assert isinstance(ex.completion, list)
                segments = renderer.conversation_segments(ex.completion)
            else:
                segments = [
                    (renderer.prompt_ids(ex.prompt), False),
                    (renderer.completion_ids(ex.prompt, ex.completion), True),
                ]
        except ValueError as err:
            raise DataError(f"{source}: row {ex.row}: {err}") from None
        ids = [t for seg, _ in segments for t in seg]
        mask = [trained or completion_only is False for seg, trained in segments for _ in seg]
        stats.rows += 1
        if len(ids) > max_length:
            stats.completion_cut += 1
            ids, mask = ids[:max_length], mask[:max_length]
        mask[0] = False  # the first token has no context to be predicted from
        if not any(mask):
            stats.dropped += 1
            continue
        records.append(SequenceRecord(tuple(ids), tuple(mask), index=len(records)))
    if not records:
        raise DataError(f"{source}: every row was dropped by truncation; raise data.max_length")
    return records, stats


def collate_sequences(records: Sequence[SequenceRecord], pad_id: int) -> SequenceBatch:
    """Right-pad sequences.

    >>> b = collate_sequences([SequenceRecord((5, 6, 7), (False, True, True), 0),
    ...                        SequenceRecord((8, 9), (False, True), 1)], pad_id=0)
    >>> b.input_ids
    tensor([[5, 6, 7],
            [8, 9, 0]])
    >>> b.loss_mask
    tensor([[False,  True,  True],
            [False,  True, False]])
    """
    input_ids, attention_mask, loss_mask = pad_rows([(r.input_ids, r.loss_mask) for r in records], pad_id)
    return SequenceBatch(input_ids, attention_mask, loss_mask, torch.tensor([r.index for r in records]))


def collate_packed(
    records: Sequence[SequenceRecord], pad_id: int, max_length: int, spans: bool = False
) -> SequenceBatch:
    """Pack records, in order, into as few rows of at most ``max_length`` tokens as first-fit allows.

    Positions restart at 0 for each record, so the model masks attention block-diagonally and each record
    is scored exactly as alone (tested); trailing pads form their own block and are off the loss mask.
    ``spans``: also give each row its records as span-attention blocks (``layout: packed``), so attention
    costs each record's causal triangle instead of a (width x width) mask.

    >>> b = collate_packed([SequenceRecord((5, 6, 7), (False, True, True), 0),
    ...                     SequenceRecord((8, 9), (False, True), 1),
    ...                     SequenceRecord((4, 3, 2, 1), (False, True, True, True), 2)], pad_id=0, max_length=5)
    >>> b.input_ids
    tensor([[5, 6, 7, 8, 9],
            [4, 3, 2, 1, 0]])
    >>> b.position_ids
    tensor([[0, 1, 2, 0, 1],
            [0, 1, 2, 3, 0]])
    >>> b.loss_mask
    tensor([[False,  True,  True, False,  True],
            [False,  True,  True,  True, False]])
    """
    rows: list[list[SequenceRecord]] = []
    room: list[int] = []
    for r in records:
        n = len(r.input_ids)
        slot = next((i for i, left in enumerate(room) if left >= n), None)
        if slot is None:
            rows.append([r])
            room.append(max_length - n)
        else:
            rows[slot].append(r)
            room[slot] -= n
    width = max(max_length - left for left in room)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for r in row:
            n = len(r.input_ids)
            input_ids[i, at : at + n] = torch.tensor(r.input_ids)
            loss_mask[i, at : at + n] = torch.tensor(r.loss_mask)
            position_ids[i, at : at + n] = torch.arange(n)
            at += n
        attention_mask[i, :at] = 1
        position_ids[i, at:] = torch.arange(width - at)
    index = torch.tensor([r.index for row in rows for r in row])
    blocks = None
    if spans:
        starts = [[sum(len(x.input_ids) for x in row[:k]) for k in range(len(row))] for row in rows]
        blocks = [
            tuple(((at, at + len(r.input_ids)), 0) for at, r in zip(row_starts, row, strict=True))
            for row_starts, row in zip(starts, rows, strict=True)
        ]
    return SequenceBatch(input_ids, attention_mask, loss_mask, index, position_ids, blocks)
