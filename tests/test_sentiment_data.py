"""The bundled controlled-sentiment prompts: shipped files equal a fresh build, openings are unique, stop
mid-sentence, stay within 6..20 words, train and held-out are disjoint, and posttrain's prompt loader reads them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.bundled import sentiment
from posttrain.data.prompts import load_prompts
from posttrain.data.tokenize import Renderer
from posttrain.fixtures import build_tokenizer

BUNDLED = Path(sentiment.__file__).resolve().parent
FILES = (sentiment.TRAIN_FILE, sentiment.HELDOUT_FILE)


def _rows(name: str) -> list[dict[str, str]]:
    with (BUNDLED / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _first_words(text: str, n: int = 8) -> tuple[str, ...]:
    return tuple(text.split()[:n])


def test_shipped_files_equal_a_fresh_build(tmp_path: Path) -> None:
    sentiment.main(["--out", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (BUNDLED / name).read_bytes(), name


def test_row_counts_fields_and_tone_balance() -> None:
    train, heldout = _rows(sentiment.TRAIN_FILE), _rows(sentiment.HELDOUT_FILE)
    assert len(train) >= 500 and len(heldout) >= 100
    for rows in (train, heldout):
        assert all(set(r) == {"prompt", "genre", "tone"} for r in rows)
        assert {r["genre"] for r in rows} == set(sentiment.GENRES)
        tones = Counter(r["tone"] for r in rows)
        assert set(tones) == set(sentiment.TONES)
        assert tones["neutral"] + tones["mixed"] > tones["positive"] + tones["negative"]  # tilted to moderate


@pytest.mark.parametrize("name", FILES)
def test_every_opening_is_unique_unfinished_and_6_to_20_words(name: str) -> None:
    prompts = [r["prompt"] for r in _rows(name)]
    assert len(set(prompts)) == len(prompts)
    for p in prompts:
        assert 6 <= len(p.split()) <= 20, p
        assert p == p.strip(), p
        assert not p.endswith((".", "!", "?", '"', "'", "\u201d", "\u2019")), p


def test_train_and_heldout_are_disjoint_even_in_their_first_8_words() -> None:
    train = [r["prompt"] for r in _rows(sentiment.TRAIN_FILE)]
    heldout = [r["prompt"] for r in _rows(sentiment.HELDOUT_FILE)]
    assert not set(train) & set(heldout)
    train_starts = {_first_words(p) for p in train}
    assert not [p for p in heldout if _first_words(p) in train_starts]


def test_build_rows_is_deterministic_and_seeded() -> None:
    assert sentiment.build_rows(30, seed=7, part=0) == sentiment.build_rows(30, seed=7, part=0)
    assert sentiment.build_rows(30, seed=7, part=0) != sentiment.build_rows(30, seed=8, part=0)


@pytest.mark.parametrize("name", FILES)
def test_loads_as_raw_text_prompts(name: str) -> None:
    renderer = Renderer(build_tokenizer(), chat_template=False)
    records, stats = load_prompts(f"bundled:{name}", "train", renderer, max_prompt_length=256)
    rows = _rows(name)
    assert len(records) == len(rows) == stats.rows
    assert stats.prompt_cut == 0
    for record, row in zip(records, rows, strict=True):
        assert record.text == record.prompt == row["prompt"]
        assert record.columns == {"genre": row["genre"], "tone": row["tone"]}
        assert renderer.tokenizer.decode(record.prompt_ids[len(renderer.bos) :]) == row["prompt"]
