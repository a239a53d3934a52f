"""Build the bundled arithmetic task: word problems and expressions of graded difficulty with a checkable answer.

    python3 -m posttrain.bundled.arithmetic [--out DIR]

writes ``arith_train.jsonl`` (500 rows) and ``arith_heldout.jsonl`` (125 rows) into ``DIR`` (default: this
folder), their rows of levels 1 and 3 as ``arith_easy_train.jsonl`` (200) and ``arith_easy_heldout.jsonl``
(50), and ``arith_easy_heldout200.jsonl``: 200 more problems of levels 1 and 3 (seed 2) that ask no
question of the other files, a held-out set large enough to tell a learnt improvement from noise. Each row
is ``{"prompt": str, "answer": str, "level": int}``: the answer is an integer written plainly ("-12",
"1540"), and every prompt ends by asking for "The answer is N.", which :class:`posttrain.rewards.NumericAnswer`
checks against the ``answer`` column. Levels 1..5 take turns (100 train and 25 held-out rows each). Every
choice comes from ``random.Random(seed)``, so the files are byte-identical on every run; README.md in this
folder lists the levels and forms.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN_SEED, HELDOUT_SEED = 0, 1
N_TRAIN, N_HELDOUT = 500, 125
TRAIN_FILE, HELDOUT_FILE = "arith_train.jsonl", "arith_heldout.jsonl"
# The levels a 135M model answers right some of the time (SmolLM2-135M-Instruct, sampled at temperature
# 0.7: level 1 about 10%, level 3 about 13%, the others about 0%): groups of 8 samples then often hold a
# success, which GRPO-style methods need to learn anything. The same rows as in the full files.
EASY_LEVELS = (1, 3)
EASY_TRAIN_FILE, EASY_HELDOUT_FILE = "arith_easy_train.jsonl", "arith_easy_heldout.jsonl"
# 50 held-out problems give a standard error of ~4.6 points at 12% accuracy, so only a jump of ~9 points is
# more than noise; 200 halve that (~2.3 points). A separate file with its own seed, so that the four files
# above keep their bytes (measured figures refer to them); it asks no question of train or of held-out.
EASY_HELDOUT200_SEED, N_EASY_HELDOUT200 = 2, 200
EASY_HELDOUT200_FILE = "arith_easy_heldout200.jsonl"
INSTRUCTION = "End with 'The answer is N.'"
BARE = ("What is {e}?", "Compute {e}.", "Calculate {e}.")
NAMES = ("Tom", "Anna", "Sam", "Mia", "Leo", "Zoe", "Ben", "Ella", "Max", "Lily")
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "stamps", "shells", "coins")


@dataclass(frozen=True)
class Form:
    """One kind of question: its expression, the value computed separately, number ranges, wordings.

    ``value`` computes the answer from the numbers directly, not by evaluating ``expression``, so the test
    that evaluates the expression checks one against the other. ``keep`` rejects draws (a negative count of
    apples, an inexact division); rejected draws are redrawn. Word problems use ``{name}`` and ``{items}``.
    """

    expression: str
    value: Callable[..., int]
    ranges: dict[str, tuple[int, int]]
    words: tuple[str, ...] = ()
    keep: Callable[..., bool] = field(default=lambda **_: True)


def _nonneg(value: Callable[..., int]) -> Callable[..., bool]:
    return lambda **n: value(**n) >= 0


LEVELS: dict[int, tuple[Form, ...]] = {
    1: (  # one step, + or -, numbers up to 20
        Form(
            "{a} + {b}",
            lambda a, b: a + b,
            {"a": (2, 20), "b": (2, 20)},
            (
                "{name} has {a} {items} and buys {b} more. How many {items} does {name} have now?",
                "There are {a} {items} in a box. {name} puts in {b} more. How many {items} are in the box?",
            ),
        ),
        Form(
            "{a} - {b}",
            lambda a, b: a - b,
            {"a": (2, 20), "b": (2, 20)},
            (
                "{name} has {a} {items} and gives {b} to a friend. How many {items} does {name} have left?",
                "There are {a} {items} on a shelf. {name} takes {b}. How many {items} are left on the shelf?",
            ),
            _nonneg(lambda a, b: a - b),
        ),
    ),
    2: (  # two steps, + and -, numbers up to 50
        Form(
            "{a} + {b} + {c}",
            lambda a, b, c: a + b + c,
            {"a": (2, 50), "b": (2, 50), "c": (2, 50)},
            ("{name} has {a} {items}, gets {b} more on Monday and {c} on Tuesday. How many {items} does {name} have?",),
        ),
        Form(
            "{a} + {b} - {c}",
            lambda a, b, c: a + b - c,
            {"a": (2, 50), "b": (2, 50), "c": (2, 50)},
            ("{name} has {a} {items}, buys {b} more and then gives away {c}. How many {items} are left?",),
            _nonneg(lambda a, b, c: a + b - c),
        ),
        Form(
            "{a} - {b} + {c}",
            lambda a, b, c: a - b + c,
            {"a": (2, 50), "b": (2, 50), "c": (2, 50)},
            ("A bus has {a} passengers. At a stop, {b} get off and {c} get on. How many passengers are on it now?",),
            lambda a, b, c: a >= b,
        ),
        Form(
            "{a} - {b} - {c}",
            lambda a, b, c: a - b - c,
            {"a": (2, 50), "b": (2, 50), "c": (2, 50)},
            ("{name} has {a} {items}, gives {b} to a friend and loses {c}. How many {items} are left?",),
            _nonneg(lambda a, b, c: a - b - c),
        ),
    ),
    3: (  # one step, * or exact /
        Form(
            "{a} * {b}",
            lambda a, b: a * b,
            {"a": (2, 12), "b": (2, 20)},
            (
                "There are {a} boxes with {b} {items} in each box. How many {items} are there in total?",
                "{name} buys {a} packs of {b} {items}. How many {items} is that?",
            ),
        ),
        Form(
            "{p} / {a}",
            lambda p, a: p // a,
            {"p": (4, 240), "a": (2, 12)},
            (
                "{name} shares {p} {items} equally among {a} friends. How many {items} does each friend get?",
                "{name} packs {p} {items} into bags of {a}. How many bags does {name} fill?",
            ),
            lambda p, a: p % a == 0 and p // a >= 2,
        ),
    ),
    4: (  # two operations with precedence or parentheses; some answers are negative
        Form(
            "{a} * {b} + {c}",
            lambda a, b, c: a * b + c,
            {"a": (2, 9), "b": (2, 12), "c": (2, 30)},
            ("{name} buys {a} packs of {b} {items} and already has {c}. How many {items} does {name} have now?",),
        ),
        Form(
            "({a} + {b}) * {c}",
            lambda a, b, c: (a + b) * c,
            {"a": (2, 12), "b": (2, 12), "c": (2, 12)},
            ("{name} has {a} red boxes and {b} blue boxes with {c} {items} in each. How many {items} in all?",),
        ),
        Form(
            "{m} - {a} * {b}",
            lambda m, a, b: m - a * b,
            {"m": (10, 100), "a": (2, 9), "b": (2, 12)},
            ("{name} has {m} dollars and buys {a} {items} at {b} dollars each. How many dollars are left?",),
            _nonneg(lambda m, a, b: m - a * b),
        ),
        Form(
            "{a} - {b} * {c}",
            lambda a, b, c: a - b * c,
            {"a": (1, 20), "b": (2, 6), "c": (2, 8)},
            ("It is {a} degrees. It gets {b} degrees colder each hour for {c} hours. What is the temperature now?",),
        ),
        Form("{a} * ({b} - {c})", lambda a, b, c: a * (b - c), {"a": (2, 9), "b": (2, 20), "c": (2, 20)}),
    ),
    5: (  # three operations, or two-digit by two-digit products
        Form(
            "({a} + {b}) * {c} - {d}",
            lambda a, b, c, d: (a + b) * c - d,
            {"a": (2, 30), "b": (2, 30), "c": (2, 9), "d": (2, 50)},
            ("A school orders {a} boxes of red pens and {b} of blue pens, {c} pens a box. {d} break. How many work?",),
        ),
        Form(
            "{a} * {b} - {c} * {d}",
            lambda a, b, c, d: a * b - c * d,
            {"a": (2, 12), "b": (2, 12), "c": (2, 12), "d": (2, 12)},
            ("{name} has {a} bags of {b} {items} and gives {c} to each of {d} friends. How many {items} are left?",),
            _nonneg(lambda a, b, c, d: a * b - c * d),
        ),
        Form("({a} - {b}) * ({c} + {d})", lambda a, b, c, d: (a - b) * (c + d), {k: (2, 20) for k in "abcd"}),
        Form(
            "{a} * {b}",
            lambda a, b: a * b,
            {"a": (11, 99), "b": (11, 99)},
            ("A theater has {a} rows with {b} seats in each row. How many seats are there?",),
        ),
    ),
}


@dataclass(frozen=True)
class Problem:
    """A generated question with the expression it asks for (kept out of the shipped rows)."""

    prompt: str
    answer: str
    level: int
    expression: str

    def row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "level": self.level}


def make_problem(rng: random.Random, level: int) -> Problem:
    """One problem of ``level``: a form, its numbers, and either the bare expression or a word problem.

    >>> problem = make_problem(random.Random(5), 4)
    >>> problem.row(), problem.expression
    ({'prompt': "What is 6 * (13 - 18)? End with 'The answer is N.'", 'answer': '-30', 'level': 4}, '6 * (13 - 18)')
    """
    form = rng.choice(LEVELS[level])
    while True:
        numbers = {k: rng.randint(lo, hi) for k, (lo, hi) in form.ranges.items()}
        if form.keep(**numbers):
            break
    expression = form.expression.format(**numbers)
    if form.words and rng.random() < 0.5:
        question = rng.choice(form.words).format(**numbers, name=rng.choice(NAMES), items=rng.choice(ITEMS))
    else:
        question = rng.choice(BARE).format(e=expression)
    return Problem(f"{question} {INSTRUCTION}", str(form.value(**numbers)), level, expression)


def build_problems(
    n: int, seed: int, exclude: Iterable[Problem] = (), levels: Sequence[int] = tuple(LEVELS)
) -> list[Problem]:
    """``n`` problems, ``levels`` taking turns; no expression asked twice nor asked by any of ``exclude``.

    The expression is the question's identity, so a word problem and the bare sum behind it count as one.
    """
    rng = random.Random(seed)
    seen = {p.expression for p in exclude}
    problems: list[Problem] = []
    for i in range(n):
        level = levels[i % len(levels)]
        for _ in range(1000):  # redraw repeats; each level has hundreds of distinct expressions or more
            problem = make_problem(rng, level)
            if problem.expression not in seen:
                break
        else:
            raise RuntimeError(f"level {level} ran out of new questions at row {i}")
        seen.add(problem.expression)
        problems.append(problem)
    return problems


def build_splits() -> tuple[list[Problem], list[Problem]]:
    """The shipped train and held-out problems; held-out uses its own seed and asks no train question."""
    train = build_problems(N_TRAIN, TRAIN_SEED)
    return train, build_problems(N_HELDOUT, HELDOUT_SEED, exclude=train)


def build_easy_heldout200(train: Sequence[Problem], heldout: Sequence[Problem]) -> list[Problem]:
    """200 problems of levels 1 and 3 (taking turns, seed 2) asking no question of ``train`` or ``heldout``."""
    exclude = [*train, *heldout]
    return build_problems(N_EASY_HELDOUT200, EASY_HELDOUT200_SEED, exclude=exclude, levels=EASY_LEVELS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, heldout = build_splits()
    easy = [[p for p in split if p.level in EASY_LEVELS] for split in (train, heldout)]
    names = (TRAIN_FILE, HELDOUT_FILE, EASY_TRAIN_FILE, EASY_HELDOUT_FILE, EASY_HELDOUT200_FILE)
    splits = (train, heldout, *easy, build_easy_heldout200(train, heldout))
    for name, problems in zip(names, splits, strict=True):
        with (args.out / name).open("w", encoding="utf-8", newline="\n") as f:
            for problem in problems:
                f.write(json.dumps(problem.row(), ensure_ascii=False) + "\n")
        chars = sum(len(p.prompt) for p in problems) / len(problems)
        print(f"{args.out / name}: {len(problems)} rows, mean prompt chars {chars:.1f}")


if __name__ == "__main__":
    main()
