"""The bundled arithmetic task: shipped files equal a fresh build, every answer is right, splits are disjoint.

Answers are checked by evaluating each problem's expression here with exact fractions (an evaluator
independent of the generator, which computes answers from the numbers with its own per-form function),
and the expression is tied to the prompt: a bare question shows it verbatim, and a word problem names
exactly its numbers. Every form and wording appears in the shipped train file, so all of them are checked.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from posttrain.bundled import arithmetic
from posttrain.rewards import NumericAnswer

BUNDLED = Path(arithmetic.__file__).resolve().parent
FULL = (arithmetic.TRAIN_FILE, arithmetic.HELDOUT_FILE)
FILES = (*FULL, arithmetic.EASY_TRAIN_FILE, arithmetic.EASY_HELDOUT_FILE)
TRAIN, HELDOUT = arithmetic.build_splits()
OPS: dict[type, Any] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: Fraction}


def _rows(name: str) -> list[dict[str, Any]]:
    with (BUNDLED / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _evaluate(node: ast.AST) -> Fraction:
    """Exact value of an expression of non-negative integers, + - * / and parentheses; nothing else."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        return Fraction(OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right)))
    raise AssertionError(f"unexpected syntax: {ast.dump(node)}")


def _ints(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"\d+", text)]


def test_evaluator_bites() -> None:
    assert _evaluate(ast.parse("6 * (13 - 18)", mode="eval")) == -30
    assert _evaluate(ast.parse("2 + 3 * 4", mode="eval")) == 14
    assert _evaluate(ast.parse("7 / 2", mode="eval")) == Fraction(7, 2)
    with pytest.raises(AssertionError, match="unexpected syntax"):
        _evaluate(ast.parse("2 ** 3", mode="eval"))


def test_shipped_files_equal_a_fresh_build(tmp_path: Path) -> None:
    arithmetic.main(["--out", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (BUNDLED / name).read_bytes(), name
    assert _rows(arithmetic.TRAIN_FILE) == [p.row() for p in TRAIN]
    assert _rows(arithmetic.HELDOUT_FILE) == [p.row() for p in HELDOUT]
    easy = [p.row() for p in TRAIN if p.level in (1, 3)]
    assert _rows(arithmetic.EASY_TRAIN_FILE) == easy and len(easy) == 200
    assert _rows(arithmetic.EASY_HELDOUT_FILE) == [p.row() for p in HELDOUT if p.level in (1, 3)]


def test_build_is_deterministic_and_seeded() -> None:
    assert arithmetic.build_problems(20, seed=7) == arithmetic.build_problems(20, seed=7)
    assert arithmetic.build_problems(20, seed=7) != arithmetic.build_problems(20, seed=8)


@pytest.mark.parametrize("name", FULL)
def test_row_fields_counts_and_all_levels_present(name: str) -> None:
    rows = _rows(name)
    assert len(rows) == {arithmetic.TRAIN_FILE: arithmetic.N_TRAIN, arithmetic.HELDOUT_FILE: arithmetic.N_HELDOUT}[name]
    per_level = Counter(r["level"] for r in rows)
    assert set(per_level) == set(arithmetic.LEVELS) == {1, 2, 3, 4, 5}
    assert len(set(per_level.values())) == 1  # levels take turns: equal counts
    for row in rows:
        assert list(row) == ["prompt", "answer", "level"], row
        assert isinstance(row["prompt"], str) and isinstance(row["level"], int), row
        assert re.fullmatch(r"-?(0|[1-9]\d*)", row["answer"]), row  # a plain integer, no commas
        assert row["prompt"].endswith(" " + arithmetic.INSTRUCTION), row
        assert len(row["prompt"].split()) <= 40, row
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert any(r["answer"].startswith("-") for r in rows)  # negatives at levels 4 and 5


@pytest.mark.parametrize("problems", [TRAIN, HELDOUT], ids=["train", "heldout"])
def test_every_answer_is_the_value_of_the_expression_the_prompt_asks(problems: list[arithmetic.Problem]) -> None:
    for p in problems:
        value = _evaluate(ast.parse(p.expression, mode="eval"))
        assert value.denominator == 1 and value == int(p.answer), p
        question = p.prompt.removesuffix(" " + arithmetic.INSTRUCTION)
        if question.startswith(("What is", "Compute", "Calculate")):
            assert question in {t.format(e=p.expression) for t in arithmetic.BARE}, p
        else:  # a word problem: exactly the expression's numbers, in any order
            assert sorted(_ints(question)) == sorted(_ints(p.expression)), p


def test_every_form_and_wording_is_in_the_train_file() -> None:
    """So that the checks above cover each one (a wording's placeholders match any text)."""
    shapes = {re.sub(r"\d+", "#", p.expression) for p in TRAIN}
    prompts = [p.prompt for p in TRAIN]
    for level, forms in arithmetic.LEVELS.items():
        for form in forms:
            assert re.sub(r"\{\w\}", "#", form.expression) in shapes, (level, form.expression)
            for wording in form.words:
                pattern = re.sub(r"\\\{\w+\\\}", ".+?", re.escape(wording))
                assert any(re.match(pattern, prompt) for prompt in prompts), (level, wording)


@pytest.mark.parametrize("name", FILES)
def test_numeric_answer_rewards_the_answer_and_not_a_near_miss(name: str) -> None:
    rows = _rows(name)
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    reward = NumericAnswer()
    assert reward(prompts, [f"The answer is {a}." for a in answers], answer=answers) == [1.0] * len(rows)
    near = [f"The answer is {int(a) + 1}." for a in answers]
    assert reward(prompts, near, answer=answers) == [0.0] * len(rows)
    with_commas = [f"So the answer is {int(a):,}." for a in answers]  # "1,540": thousands separators
    assert reward(prompts, with_commas, answer=answers) == [1.0] * len(rows)


def test_heldout_is_disjoint_from_train() -> None:
    train, heldout = _rows(arithmetic.TRAIN_FILE), _rows(arithmetic.HELDOUT_FILE)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    # Stricter: no expression is shared, so a held-out word problem is never a reworded train sum.
    assert not {p.expression for p in TRAIN} & {p.expression for p in HELDOUT}
    assert len({p.expression for p in TRAIN}) == len(TRAIN)
