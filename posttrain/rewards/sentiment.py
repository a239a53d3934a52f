"""A sentiment reward: the VADER compound score of each completion, the controlled-sentiment task's reward.

The DPO paper's first experiment (Rafailov et al. 2023, Sec. 6.1, Fig. 2) continues film-review openings
and rewards positive sentiment with a trained classifier. Here the scorer is VADER (Hutto and Gilbert 2014,
"VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM): a lexicon
with rules for negation, intensifiers and punctuation, whose *compound* score is the normalised sum of the
word valences, in [-1, 1]. It needs no model and no download, and runs in microseconds per text; it is
not the paper's classifier probability, so compare methods with each other on it, not with the paper's
numbers.

VADER is an optional extra (``pip install 'posttrain[sentiment]'``, the ``vaderSentiment`` package, MIT),
imported here and nowhere else, when a :class:`Sentiment` reward is built.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

INSTALL = "pip install 'posttrain[sentiment]'"


@functools.lru_cache(maxsize=1)
def analyzer() -> Any:
    """VADER's ``SentimentIntensityAnalyzer`` (its lexicon read once per process); ValueError when the
    package is missing, saying how to install it."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ValueError(f"needs the vaderSentiment package ({err}): {INSTALL}") from None
    return SentimentIntensityAnalyzer()


class Sentiment:
    """The VADER compound score of each completion, in [-1, 1]: positive sentiment pays (``target:
    positive``, the default) or negative sentiment does (``target: negative``, the score negated).

    ``with_prompt``: score the prompt and the completion as one text (the whole review) instead of the
    completion alone. Off by default: the completion is what the policy wrote, and the opening's own tone
    would shift every sample of a prompt alike.

    >>> reward = Sentiment()  # doctest: +SKIP
    >>> reward(["The film"] * 2, [" was wonderful, I loved it.", " was dull and far too long."])  # doctest: +SKIP
    [0.8225, -0.4019]
    """

    def __init__(self, target: str = "positive", with_prompt: bool = False) -> None:
        if target not in ("positive", "negative"):
            raise ValueError(f"target must be 'positive' or 'negative', got {target!r}")
        self.sign = 1.0 if target == "positive" else -1.0
        self.with_prompt = with_prompt
        self.required_columns = ()
        self._vader = analyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)] if self.with_prompt else completions
        return [self.sign * float(self._vader.polarity_scores(t)["compound"]) for t in texts]
