"""The 200-problem easy held-out set: its size and levels, a byte-identical rebuild, no question shared with train.

Its answers are checked like every other arithmetic row: this file only adds what is particular to it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from posttrain.bundled import arithmetic
from posttrain.rewards import NumericAnswer

BUNDLED = Path(arithmetic.__file__).resolve().parent
TRAIN, HELDOUT = arithmetic.build_splits()
HELDOUT200 = arithmetic.build_easy_heldout200(TRAIN, HELDOUT)


def _rows(name: str) -> list[dict[str, Any]]:
    with (BUNDLED / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_size_levels_and_fields() -> None:
    rows = _rows(arithmetic.EASY_HELDOUT200_FILE)
    assert len(rows) == arithmetic.N_EASY_HELDOUT200 >= 200
    assert Counter(r["level"] for r in rows) == {1: 100, 3: 100}
    assert rows == [p.row() for p in HELDOUT200]
    for row in rows:
        assert list(row) == ["prompt", "answer", "level"], row
        assert re.fullmatch(r"(0|[1-9]\d*)", row["answer"]), row  # no negatives at levels 1 and 3
        assert row["prompt"].endswith(" " + arithmetic.INSTRUCTION), row
    assert len({r["prompt"] for r in rows}) == len(rows)
    answers = [r["answer"] for r in rows]
    prompts = [r["prompt"] for r in rows]
    assert NumericAnswer()(prompts, [f"The answer is {a}." for a in answers], answer=answers) == [1.0] * len(rows)


def test_disjoint_from_train_and_heldout() -> None:
    rows = _rows(arithmetic.EASY_HELDOUT200_FILE)
    prompts = {r["prompt"] for r in rows}
    for name in (arithmetic.EASY_TRAIN_FILE, arithmetic.TRAIN_FILE, arithmetic.EASY_HELDOUT_FILE):
        assert not prompts & {r["prompt"] for r in _rows(name)}, name
    # Stricter: no expression is shared, so no problem is a reworded train (or held-out) question.
    expressions = {p.expression for p in HELDOUT200}
    assert len(expressions) == len(HELDOUT200)
    assert not expressions & {p.expression for p in [*TRAIN, *HELDOUT]}


def test_rebuild_is_byte_identical_and_leaves_the_other_files_alone(tmp_path: Path) -> None:
    arithmetic.main(["--out", str(tmp_path)])
    names = (arithmetic.EASY_HELDOUT200_FILE, arithmetic.TRAIN_FILE, arithmetic.HELDOUT_FILE,
             arithmetic.EASY_TRAIN_FILE, arithmetic.EASY_HELDOUT_FILE)  # fmt: skip
    for name in names:
        assert (tmp_path / name).read_bytes() == (BUNDLED / name).read_bytes(), name
    again = arithmetic.build_easy_heldout200(*arithmetic.build_splits())
    assert again == HELDOUT200
