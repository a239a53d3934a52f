"""One run, by its method's loop: what ``posttrain train`` and :func:`posttrain.train` call.

The offline methods go to :func:`posttrain.training.offline.run`, GRPO, RLOO and PPO to
:func:`posttrain.training.online.run_online`, iterative DPO to
:func:`posttrain.training.iterative.run_iterative` (whose rounds are offline runs). Picking here, above the
three loops, keeps each loop importable on its own: no loop imports another to hand a config on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain import determinism, distributed
from posttrain.algorithms.online import IterativeDPO, OnlineAlgorithm
from posttrain.config import TrainConfig, check_models, load
from posttrain.model import lora
from posttrain.model.load import remote_code
from posttrain.training import offline
from posttrain.training.iterative import run_iterative
from posttrain.training.offline import RunResult, check_processes
from posttrain.training.online import run_online


def run(
    source: str | Path | dict[str, Any] | TrainConfig, overrides: Sequence[str] = (), resume: bool = False
) -> RunResult:
    """Train one method end to end; ``source``: a YAML path, a dict or a config, with ``--set`` overrides."""
    config = load(source, overrides)
    if not isinstance(config.algorithm, OnlineAlgorithm):
        return offline.run(config, resume=resume)
    check_models(config)  # the model paths, before anything loads or is written
    with remote_code(config.trust_remote_code):  # every model load of the run honours the key
        determinism.configure(config.deterministic)  # first: before anything starts CUDA (and cuBLAS)
        lora.check_quantization(config)
        distributed.setup()  # torchrun: join the other processes (nothing with one)
        check_processes(config)
        if isinstance(config.algorithm, IterativeDPO):  # rounds of sampling, each trained by the offline loop
            return run_iterative(config, resume=resume)
        return run_online(config, resume=resume)  # the second loop: prompts -> samples -> rewards
