"""Rule-based rewards, their combination and loading: values by hand, errors that name reward and sample."""

from __future__ import annotations

import doctest
import math
import re
from pathlib import Path
from typing import Any

import pytest

from posttrain.rewards import combine, rules
from posttrain.rewards.combine import CombinedReward, RewardError, load_reward, load_rewards
from posttrain.rewards.model import RewardModelScorer
from posttrain.rewards.rules import (
    LengthPenalty,
    NumericAnswer,
    RegexFormat,
    SoftOverlongPunishment,
    TruncationPenalty,
    extract_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", 42.0),
        ("3 + 4 = 7", 7.0),  # no marker: the last number
        ("The answer is 7. Check: 7 + 0 = 7, and 8 is wrong", 7.0),  # the marker wins over the last number
        ("answer is 1 ... The answer is 5, not 6", 5.0),  # the LAST marker
        ("The Answer Is: -3", -3.0),  # case-insensitive, "is:" and a negative
        ("Final answer: 12 apples", 12.0),
        ("so #### 72", 72.0),  # GSM8K
        (r"\boxed{-4}", -4.0),
        ("The answer is unclear; 9 maybe", 9.0),  # no number after the marker: the last number
        ("It costs 1,234,567 dollars", 1234567.0),  # thousands separators
        ("-1,234.5", -1234.5),
        ("0.25 of them", 0.25),
        ("−7 degrees", -7.0),  # U+2212 minus
        ("10-3", 3.0),  # a minus after a digit is an operator
        ("x-3", 3.0),
        ("(-3)", -3.0),
        ("1,2,3", 3.0),  # not thousands groups: a list
        ("1,23", 23.0),
        ("version 1.2.3", 1.2),
        ("It is 5.", 5.0),  # a sentence's full stop is not a decimal point
        ("3rd place", 3.0),
        ("H2O", None),  # a digit inside a word is not a number
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text: str, expected: float | None) -> None:
    assert extract_number(text) == expected


def test_numeric_answer_by_hand() -> None:
    prompts = ["q"] * 7
    completions = ["The answer is 4.", "4", "It is 5.", "four", "1,000 total", "-2", "3.1416"]
    answers: list[Any] = ["4", 4, "4", "4", "1000", -2.0, "3.14"]
    assert NumericAnswer()(prompts, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    loose = NumericAnswer(column="solution", correct=2.0, wrong=-1.0, tolerance=0.01)
    assert loose(prompts, completions, solution=answers) == [2.0, 2.0, -1.0, -1.0, 2.0, 2.0, 2.0]


def test_numeric_answer_reads_a_gsm8k_solution_column() -> None:
    solution = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
    assert NumericAnswer()(["q", "q"], ["The answer is 72.", "24"], answer=[solution, solution]) == [1.0, 0.0]


def test_numeric_answer_errors_name_the_column_and_sample() -> None:
    with pytest.raises(ValueError, match=r"needs the column 'answer'; columns given: \['level'\]"):
        NumericAnswer()(["q"], ["1"], level=[1])
    with pytest.raises(ValueError, match=r"sample 1: column 'answer' holds no number: 'none'"):
        NumericAnswer()(["q", "q"], ["1", "2"], answer=["1", "none"])
    with pytest.raises(ValueError, match="1 values for 2 completions"):
        NumericAnswer()(["q", "q"], ["1", "2"], answer=["1"])
    with pytest.raises(ValueError, match="tolerance"):
        NumericAnswer(tolerance=-1.0)


def test_regex_format() -> None:
    completions = ["<answer>4</answer>", " <answer>4</answer>", "x <answer>4</answer>", "<answer>\n4\n</answer>"]
    prompts = ["q"] * len(completions)
    assert RegexFormat(r"<answer>.*</answer>")(prompts, completions) == [1.0, 1.0, 1.0, 1.0]
    full = RegexFormat(r"<answer>.*</answer>", reward=0.5, penalty=-0.5, fullmatch=True)
    assert full(prompts, completions) == [0.5, -0.5, -0.5, 0.5]  # whitespace counts; DOTALL spans lines
    assert RegexFormat(r"<answer>.*</answer>", flags=0)(prompts, completions) == [1.0, 1.0, 1.0, 0.0]


def test_length_penalty_formula() -> None:
    """-coef * max(0, L - target): target 10 chars, coef 0.1; lengths 3, 10, 11, 30 -> 0, 0, -0.1, -2.0."""
    completions = ["a" * n for n in (3, 10, 11, 30)]
    values = LengthPenalty(target_chars=10, coef=0.1)(["q"] * 4, completions)
    assert values == pytest.approx([0.0, 0.0, -0.1, -2.0], abs=1e-12)
    assert math.copysign(1.0, values[0]) == 1.0  # 0.0, not -0.0
    tokens = LengthPenalty(target_tokens=100, coef=0.01)
    assert tokens(["q"] * 3, ["", "", ""], completion_lengths=[50, 100, 300]) == pytest.approx([0.0, 0.0, -2.0])
    with pytest.raises(ValueError, match="completion_lengths"):
        tokens(["q"], ["abc"])
    for bad in ({}, {"target_chars": 5, "target_tokens": 5}):
        with pytest.raises(ValueError, match="exactly one of"):
            LengthPenalty(**bad)
    with pytest.raises(ValueError, match="coef >= 0"):
        LengthPenalty(target_chars=5, coef=-1.0)


def test_soft_overlong_punishment_dapo_eq13() -> None:
    """DAPO's setting L_max = 20480, L_cache = 4096: free up to 16384 tokens, then (16384 - |y|) / 4096 down
    to -1 at 20480, -1 beyond: 16385 -> -1/4096, 18432 -> -0.5, 20479 -> -4095/4096."""
    reward = SoftOverlongPunishment(max_length=20480, cache=4096)
    lengths = [0, 16384, 16385, 18432, 20479, 20480, 20481, 30000]
    expected = [0.0, 0.0, -1 / 4096, -0.5, -4095 / 4096, -1.0, -1.0, -1.0]
    assert reward(["q"] * 8, [""] * 8, completion_lengths=lengths) == expected
    whole = SoftOverlongPunishment(max_length=8, cache=8)  # cache == max_length: linear from 0 tokens
    assert whole(["q"] * 3, [""] * 3, completion_lengths=[0, 2, 8]) == [0.0, -0.25, -1.0]
    with pytest.raises(ValueError, match="needs the column 'completion_lengths'"):
        reward(["q"], ["text"])
    for max_length, cache in ((10, 0), (10, 11)):
        with pytest.raises(ValueError, match="0 < cache <= max_length"):
            SoftOverlongPunishment(max_length, cache)


def _combined() -> CombinedReward:
    return CombinedReward(
        [
            ("correct", NumericAnswer(), 1.0),
            ("format", RegexFormat(r"^The answer is"), 0.5),
            ("length", LengthPenalty(target_chars=20, coef=0.1), 2.0),
            ("logged", RegexFormat(r"\d"), 0.0),
        ]
    )


def test_combined_weights_and_per_reward_lists() -> None:
    """Sample 0 "The answer is 12." (17 chars): 1*1 + 0.5*1 + 2*0 + 0*1 = 1.5.
    Sample 1 "I think it is 13, the answer is 12" (34 chars): 1*1 + 0.5*0 + 2*(-0.1*14) + 0 = -1.8.
    Sample 2 "no idea" (7 chars): 0 + 0 + 0 + 0 = 0."""
    completions = ["The answer is 12.", "I think it is 13, the answer is 12", "no idea"]
    scores = _combined().score(["p0", "p1", "p2"], completions, answer=["12", "12", "12"])
    assert scores.per_reward == {
        "correct": [1.0, 1.0, 0.0],
        "format": [1.0, 0.0, 0.0],
        "length": pytest.approx([0.0, -1.4, 0.0]),
        "logged": [1.0, 1.0, 0.0],
    }
    assert scores.total == pytest.approx([1.5, -1.8, 0.0])
    assert _combined()(["p0", "p1", "p2"], completions, answer=["12"] * 3) == scores.total


def test_combined_rejects_bad_construction_and_mismatched_columns() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CombinedReward([])
    with pytest.raises(ValueError, match="unique"):
        CombinedReward([("a", NumericAnswer(), 1.0), ("a", NumericAnswer(), 1.0)])
    with pytest.raises(ValueError, match="finite weight"):
        CombinedReward([("a", NumericAnswer(), math.nan)])
    with pytest.raises(ValueError, match="2 prompts but 1 values in 'answer'"):
        _combined()(["p", "p"], ["1", "2"], answer=["1"])


def _fails_on_seven(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    return [1.0 / (7 - int(c)) for c in completions]


def test_reward_error_names_the_reward_and_the_sample() -> None:
    long_prompt = "Tom has 3 apples and buys 4 more. " * 5
    prompts = ["short", "other", long_prompt]
    combined = CombinedReward([("correct", NumericAnswer(), 1.0), ("div", _fails_on_seven, 1.0)])
    with pytest.raises(RewardError) as info:
        combined(prompts, ["1", "2", "7"], answer=["1", "2", "7"])
    err = info.value
    assert (err.reward, err.index, err.prompt) == ("div", 2, long_prompt[:80])
    assert (
        str(err)
        == f"reward 'div' failed on sample 2 (prompt {long_prompt[:80]!r}): ZeroDivisionError: float division by zero"
    )
    assert isinstance(err.__cause__, ZeroDivisionError)


def _returning(values: Any) -> Any:
    """A reward that returns ``values`` whatever it is given."""
    return lambda prompts, completions, **columns: values


def test_reward_error_for_a_batch_only_failure_wrong_count_and_nan() -> None:
    def batch_only(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        if len(prompts) > 1:
            raise RuntimeError("out of memory")
        return [0.0]

    with pytest.raises(RewardError, match=r"'oom' failed on a batch of 2 \(no sample fails alone\)") as info:
        CombinedReward([("oom", batch_only, 1.0)])(["a", "b"], ["x", "y"])
    assert info.value.index is None
    with pytest.raises(RewardError, match="reward 'short' returned 1 values for 2 samples"):
        CombinedReward([("short", _returning([1.0]), 1.0)])(["a", "b"], ["x", "y"])
    for bad in (math.nan, math.inf, None, "x"):
        returns_bad = _returning([0.0, bad])
        with pytest.raises(RewardError, match=r"reward 'bad' returned .* for sample 1 \(prompt 'b'\)") as info:
            CombinedReward([("bad", returns_bad, 1.0)])(["a", "b"], ["x", "y"])
        assert info.value.index == 1
    with pytest.raises(RewardError, match="reward 'scalar' returned float, not a list of floats"):
        CombinedReward([("scalar", _returning(1.0), 1.0)])(["a"], ["x"])


MODULE = """
def exact(prompts, completions, **columns):
    return [float(c == a) for c, a in zip(completions, columns["answer"])]

class StartsWith:
    def __init__(self, prefix, reward=1.0):
        self.prefix, self.reward = prefix, reward
    def __call__(self, prompts, completions, **columns):
        return [self.reward if c.startswith(self.prefix) else 0.0 for c in completions]
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_rewards_for_test.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_for_test"


def test_load_reward_by_import_path(user_module: str) -> None:
    name, fn, weight = load_reward(f"{user_module}:exact")
    assert (name, weight) == (f"{user_module}:exact", 1.0)
    assert fn(["q", "q"], ["4", "5"], answer=["4", "4"]) == [1.0, 0.0]
    loaded = load_reward({"name": f"{user_module}.StartsWith", "prefix": "A", "reward": 3.0, "weight": 0.5})
    assert loaded.weight == 0.5 and loaded.fn(["q", "q"], ["Ab", "b"]) == [3.0, 0.0]
    combined = load_rewards(
        [{"name": f"{user_module}:exact", "label": "exact"}, {"name": "regex_format", "pattern": "^4", "weight": 2}]
    )
    assert combined.score(["q"], ["4"], answer=["4"]).per_reward == {"exact": [1.0], "regex_format": [1.0]}
    assert combined(["q"], ["4"], answer=["4"]) == [3.0]


def test_load_reward_by_builtin_name() -> None:
    cases = {
        "numeric_answer": ({"column": "solution"}, NumericAnswer),
        "regex_format": ({"pattern": "x", "fullmatch": True}, RegexFormat),
        "length_penalty": ({"target_tokens": 10, "coef": 0.5}, LengthPenalty),
        "overlong": ({"max_length": 100, "cache": 20}, SoftOverlongPunishment),
        "truncation_penalty": ({"penalty": -0.5}, TruncationPenalty),
    }
    for name, (options, cls) in cases.items():
        loaded = load_reward({"name": name, "weight": 2.0, **options})
        assert loaded.name == name and loaded.weight == 2.0 and type(loaded.fn) is cls
    assert load_reward({"name": "overlong", "max_length": 100, "cache": 20}).fn.cache == 20
    assert set(combine.BUILTIN_REWARDS) == {
        "numeric_answer",
        "regex_format",
        "length_penalty",
        "overlong",
        "truncation_penalty",
        "reward_model",
        "sentiment",
    }
    cut = load_reward({"name": "truncation_penalty", "penalty": -0.5}).fn
    assert cut(["q", "q"], ["a", "b"], truncated=[True, False]) == [-0.5, 0.0]


def test_load_reward_model_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``reward_model`` builds a RewardModelScorer, which scores inside a CombinedReward like any rule."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm")
    loaded = load_reward({"name": "reward_model", "path": str(tmp_path / "rm"), "device": "cpu", "weight": 0.5})
    assert isinstance(loaded.fn, RewardModelScorer)
    combined = CombinedReward([loaded, ("correct", NumericAnswer(), 1.0)])
    scores = combined.score(["What is 2 + 2?"] * 2, ["The answer is 4.", "5"], answer=["4", "4"])
    rm = scores.per_reward["reward_model"]
    assert len(rm) == 2 and all(math.isfinite(v) for v in rm)
    assert scores.total == pytest.approx([0.5 * rm[0] + 1.0, 0.5 * rm[1]])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"weight": 1.0}, "name: is required"),
        ("no_such_reward", "reward 'no_such_reward': not a built-in reward"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("posttrain.rewards.rules:Nope", "has no attribute 'Nope'"),
        ({"name": "numeric_answer", "colum": "x"}, "unknown option 'colum' (did you mean 'column'?)"),
        ({"name": "reward_model"}, "missing a required argument: 'path'"),
        ({"name": "posttrain.rewards.rules:extract_number", "x": 1}, "not a class, so it takes no options"),
        ({"name": "numeric_answer", "weight": "1"}, "weight must be a finite number"),
        ({"name": "numeric_answer", "weight": True}, "weight must be a finite number"),
        ({"name": "numeric_answer", "weight": math.inf}, "weight must be a finite number"),
        ("posttrain.rewards.combine:BUILTIN_REWARDS", "not callable (a dict)"),
    ],
)
def test_load_reward_errors(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_reward(spec)


@pytest.mark.parametrize("module", [rules, combine])
def test_doctests(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
