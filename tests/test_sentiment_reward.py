"""The built-in ``sentiment`` reward: VADER's compound score of each completion, behind one lazy import."""

from __future__ import annotations

import builtins
from typing import Any

import pytest

from posttrain.config import ConfigError
from posttrain.rewards import sentiment
from posttrain.rewards.combine import load_reward
from posttrain.rewards.specs import check_specs

pytest.importorskip("vaderSentiment")


def test_positive_words_pay_and_negative_ones_cost() -> None:
    reward = load_reward("sentiment").fn
    good, flat, bad = reward(["The film"] * 3, [" was wonderful, I loved it.", " was released in May.", " was dull."])
    assert good > 0.5 and flat == 0.0 and bad < -0.3
    assert all(-1.0 <= x <= 1.0 for x in (good, flat, bad))
    negative = load_reward({"name": "sentiment", "target": "negative"}).fn
    assert negative(["x"], [" was wonderful, I loved it."]) == [-good]


def test_with_prompt_scores_the_whole_review() -> None:
    alone = load_reward("sentiment").fn
    whole = load_reward({"name": "sentiment", "with_prompt": True}).fn
    assert alone(["A wonderful film that"], [" ends."]) == [0.0]
    assert whole(["A wonderful film that"], [" ends."])[0] > 0.4


def test_a_bad_target_is_one_line_naming_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"rewards\[0\] \(sentiment\): ValueError: target must be 'positive' or"):
        check_specs([{"name": "sentiment", "target": "up"}])


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_vader(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("vaderSentiment"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    sentiment.analyzer.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_vader)
    try:
        with pytest.raises(ConfigError, match=r"rewards\[0\] \(sentiment\): .*pip install 'posttrain\[sentiment\]'"):
            check_specs(["sentiment"])
    finally:
        sentiment.analyzer.cache_clear()
