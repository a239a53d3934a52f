"""posttrain: post-training for causal language models, one design for every method.

``posttrain.train(config)`` runs what ``posttrain train CONFIG.yaml`` runs (one run, or a pipeline of
stages); ``posttrain.losses`` holds one pure function per loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from posttrain.config import TrainConfig
    from posttrain.training.offline import RunResult


def train(config: str | Any | TrainConfig, overrides: tuple[str, ...] = (), resume: bool = False) -> RunResult:
    """Train from a YAML path, a dict or a :class:`~posttrain.config.TrainConfig`; returns the run's result.

    A config with ``stages:`` is a pipeline (:func:`posttrain.pipeline.run_pipeline`, which returns every
    stage's result): this returns the last stage's."""
    from posttrain.pipeline import is_pipeline, run_pipeline
    from posttrain.training.dispatch import run

    if is_pipeline(config):
        return run_pipeline(config, overrides=overrides, resume=resume)[-1]
    return run(config, overrides=overrides, resume=resume)


__all__ = ["__version__", "train"]
