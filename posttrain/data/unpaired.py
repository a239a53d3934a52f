"""Unpaired feedback for KTO: read and validate rows, tokenize once, pair each prompt with a fixed other
completion for the KL baseline, lay out batches.

Rows come in two shapes, and a file may mix them:

* unpaired: ``prompt``, ``completion`` and ``label`` (True: desirable, False: undesirable). ``prompt`` and
  ``completion`` are strings, or a conversation and the assistant's reply (a list of ``{role, content}``
  messages ending with the assistant), as in TRL's unpaired-preference format. ``label`` is a boolean; the
  strings ``"true"`` and ``"false"`` (any case) are accepted too, because CSV cells are text. Numbers are
  rejected: a 0/1 column is too often a rating.
* a preference pair (any shape :mod:`posttrain.data.formats` reads: ``chosen`` and ``rejected``, with or
  without ``prompt``): split into two examples, chosen with label True, then rejected with label False, as
  the KTO paper does with preference data (Section 4.1, "Data").

A bad row raises :class:`DataError` with one line naming the file, the row and the field.

The KL baseline ``z0`` of the paper is estimated from MISMATCHED pairs (a prompt with a completion that
was written for another prompt). Each record gets one fixed partner, ``kl_partners``: a seeded derangement
of the whole split, so a record's mismatched pair never changes and its reference log-prob can be cached
like its own. The partner's completion is cut to fit after the record's prompt (the truncation policy of
:func:`posttrain.data.tokenize.truncate`: a completion keeps its first tokens).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posttrain.data.collate import pack_units, pad_completions
from posttrain.data.examples import UnpairedExample, UnpairedRecord
from posttrain.data.formats import DataError, _Row, preference_example, read_rows
from posttrain.data.tokenize import Renderer, TruncationStats, truncate
from posttrain.packing import Spans, sequence_counts


def _label(r: _Row) -> bool:
    if "label" not in r.row or r.row["label"] is None:
        raise r.fail("label", "missing (true for a desirable completion, false for an undesirable one)")
    value = r.row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise r.fail("label", f"expected true or false, got {value!r}")


def unpaired_examples(source: str, number: int, row: Any) -> list[UnpairedExample]:
    """Validate one row: an unpaired row gives one example, a preference pair two (chosen True first)."""
    if isinstance(row, dict) and "completion" not in row and ("chosen" in row or "rejected" in row):
        pair = preference_example(source, number, row)
        return [
            UnpairedExample(pair.prompt, pair.chosen, True, number),
            UnpairedExample(pair.prompt, pair.rejected, False, number),
        ]
    r = _Row(source, number, row)
    prompt = r.text_or_messages("prompt")
    completion = r.text_or_messages("completion")
    if isinstance(completion, list):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if completion[-1]["role"] != "assistant":
            ends = completion[-1]["role"]
            raise r.fail("completion", f"the conversation must end with the assistant, ends with {ends!r}")
    elif isinstance(prompt, list):
        raise r.fail("completion", "must be a list of messages when 'prompt' is a conversation")
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        raise r.fail("prompt", "must not end with the assistant (the completion is the assistant's turn)")
    return [UnpairedExample(prompt, completion, _label(r), number)]


def load_unpaired(source: str, split: str = "train") -> list[UnpairedExample]:
    """Read and validate every row; the first bad row raises :class:`DataError`. An empty file too."""
    examples = [ex for number, row in read_rows(source, split) for ex in unpaired_examples(source, number, row)]
    if not examples:
        raise DataError(f"{source}: no rows")
    return examples


def kl_partners(prompts: Sequence[Hashable], seed: int) -> list[int]:
    """A seeded derangement: ``partner[i] != i``, a permutation, the same for the same prompts and seed.

    Records are grouped by prompt, the groups and each group's members are shuffled, laid out in a row, and
    each record takes the record ``s`` places further on (cyclically), ``s`` the largest group's size. A
    group is contiguous and at most ``s`` long, so its partners lie outside it: no record is paired with
    its own prompt (a preference pair's two halves, say) unless one prompt holds more than half of the
    records, where no permutation could avoid it. With distinct prompts (``s = 1``) this is a random
    cyclic order, each record paired with the next, as the paper's implementation does within a batch.

    >>> kl_partners(["a", "b", "c", "d"], seed=0)
    [1, 3, 0, 2]
    >>> kl_partners(["p", "p", "q", "q", "r", "r"], seed=0)  # two records per prompt, as from pairs
    [3, 2, 4, 5, 1, 0]
    """
    n = len(prompts)
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    g = torch.Generator().manual_seed(seed)
    groups: dict[Hashable, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    blocks = list(groups.values())
    layout = [
        blocks[b][m]
        for b in torch.randperm(len(blocks), generator=g).tolist()
        for m in torch.randperm(len(blocks[b]), generator=g).tolist()
    ]
    largest = max(len(block) for block in blocks)
    shift = largest if largest < n else 1  # one prompt for every record: any cyclic shift will do
    partner = [0] * n
    for k, i in enumerate(layout):
        partner[i] = layout[(k + shift) % n]
    return partner


def tokenize_unpaired(
    examples: Sequence[UnpairedExample],
    renderer: Renderer,
    max_length: int,
    max_prompt_length: int,
    source: str = "data",
    seed: int = 0,
) -> tuple[list[UnpairedRecord], TruncationStats]:
    """Tokenize every example once, then give each kept record its KL partner's completion.

    Prompt and completion are tokenized separately (as for pairs), so a mismatched pair is just
    ``prompt_ids[i] + completion_ids[partner[i]]``, cut to ``max_length``. Partners are drawn among the
    records that survive truncation, keyed by prompt ids, with ``seed``.
    """
    stats = TruncationStats()
    kept: list[tuple[tuple[int, ...], tuple[int, ...], bool, int]] = []
    for ex in examples:
        try:
            prompt = renderer.prompt_ids(ex.prompt)
            completion = renderer.completion_ids(ex.prompt, ex.completion)
        except ValueError as err:
            raise DataError(f"{source}: row {ex.row}: {err}") from None
        if not prompt:
            raise DataError(f"{source}: row {ex.row}: field 'prompt': tokenizes to no tokens")
        cut = truncate(prompt, [completion], max_length, max_prompt_length, stats)
        if cut is not None:
            p, (c,) = cut
            kept.append((p, c, ex.label, ex.row))
    if not kept:
        raise DataError(f"{source}: every row was dropped by truncation; raise data.max_length")
    if len(kept) < 2:
        raise DataError(
            f"{source}: KTO needs at least 2 examples (its KL baseline pairs each prompt with another "
            f"example's completion), got {len(kept)}"
        )
    partners = kl_partners([p for p, _, _, _ in kept], seed)
    records = [
        UnpairedRecord(p, c, label, index=i, kl_completion_ids=kept[partners[i]][1][: max_length - len(p)], row=row)
        for i, (p, c, label, row) in enumerate(kept)
    ]
    return records, stats


@dataclass(frozen=True)
class UnpairedBatch:
    """B right-padded rows of prompt + completion (or, with ``kl``, prompt + the partner's completion).

    ``input_ids``, ``attention_mask``, ``loss_mask``: (B, T); ``index``: (B,) data set positions;
    ``labels``: (B,) bool, True where the record's own completion is desirable. The packed layout puts
    the B sequences in one row (``position_ids``, ``sequence``, ``spans``: see
    :func:`posttrain.data.collate.pack_units`).
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    index: Tensor
    labels: Tensor
    kl: bool = False
    position_ids: Tensor | None = None
    sequence: Tensor | None = None
    spans: Spans | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def num_sequences(self) -> int:
        return len(self)

    def completion_counts(self) -> Tensor:
        """(B,) completion tokens of each example."""
        return sequence_counts(self.loss_mask, self.sequence, len(self))


def collate_unpaired(
    records: Sequence[UnpairedRecord], pad_id: int, kl: bool = False, layout: str = "padded"
) -> UnpairedBatch:
    """Lay out records as rows ``prompt + completion``; with ``kl=True``, ``prompt + kl_completion``;
    ``layout: packed`` puts them all in one row.

    >>> r = UnpairedRecord(prompt_ids=(5, 6), completion_ids=(7,), label=True, index=3, kl_completion_ids=(8, 9))
    >>> b = collate_unpaired([r, UnpairedRecord((5,), (4, 4, 4), False, 4, (7,))], pad_id=0)
    >>> b.input_ids
    tensor([[5, 6, 7, 0],
            [5, 4, 4, 4]])
    >>> b.loss_mask
    tensor([[False, False,  True, False],
            [False,  True,  True,  True]])
    >>> b.labels, b.index
    (tensor([ True, False]), tensor([3, 4]))
    >>> collate_unpaired([r], pad_id=0, kl=True).input_ids
    tensor([[5, 6, 8, 9]])
    """
    rows = [(r.prompt_ids, r.kl_completion_ids if kl else r.completion_ids) for r in records]
    index = torch.tensor([r.index for r in records], dtype=torch.long)
    labels = torch.tensor([r.label for r in records], dtype=torch.bool)
    if layout != "padded":  # one completion per prompt: nothing to share, packed either way
        p = pack_units([(prompt, (completion,)) for prompt, completion in rows], share_prefix=False)
        return UnpairedBatch(p.input_ids, p.attention_mask, p.loss_mask, index, labels, kl, p.position_ids,
                             p.sequence, p.spans)  # fmt: skip
    input_ids, attention_mask, loss_mask = pad_completions(rows, pad_id)
    return UnpairedBatch(input_ids, attention_mask, loss_mask, index, labels, kl)


__all__ = [
    "UnpairedBatch",
    "collate_unpaired",
    "kl_partners",
    "load_unpaired",
    "tokenize_unpaired",
    "unpaired_examples",
]
