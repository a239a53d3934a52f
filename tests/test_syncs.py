"""At most one device-to-host read per optimizer step (issue: fast where users train).

On a GPU every ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()`` or ``.cpu()`` of a device tensor waits for
all the work queued before it; a loop that reads a figure per micro-batch keeps the GPU idle between its
kernels. The loops keep their figures on the device and read them once per step (:mod:`posttrain.training.
readout`). A CPU has no such cost, so here every conversion of ANY tensor to Python inside the step counts:
host-side bookkeeping (batch order, token counts of the collated rows) is written with Python numbers, and
the counters below hold the loops to exactly one read per step. Host tensors by construction (a batch
order, a collated mask before its transfer) are read through :func:`posttrain.host.host_values`, which
refuses device tensors; those reads are not counted. (``torch.cuda.set_sync_debug_mode`` shows the
same on a GPU but misses some syncs: this count is the contract.)

Counted: from one optimizer step's end to the next one's, so the step's own read, its logging and the
progress bar are in it. Steps that evaluate or save are outside the window (no eval_steps, no save_steps).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from support import first_bundled_pairs, run_config, write_word_prompts

import posttrain
from posttrain import host
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training import online, optim

USING_HOST_VALUES = (
    "posttrain.training.offline",
    "posttrain.training.online",
    "posttrain.training.rollouts",
    "posttrain.training.task",
    "posttrain.model.logps",
    "posttrain.rollout.advantages",
    "posttrain.training.completions",
)
"""Modules that read host tensors through :func:`posttrain.host.host_values` (not device reads)."""
CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_reads() -> Iterator[list[int]]:
    """Count tensor -> Python conversions; the list gets the running count at each optimizer step's end."""
    calls = [0]
    at_steps: list[int] = []
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counted(name: str) -> Any:
        original = originals[name]

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls[0] += not inside_uncounted[0]
            return original(self, *args, **kwargs)

        return wrapper

    inside_uncounted = [0]  # a depth: sample_all calls host_values

    def uncounted(function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            inside_uncounted[0] += 1
            try:
                return function(*args, **kwargs)
            finally:
                inside_uncounted[0] -= 1

        return call

    # host_values: host tensors by construction (it refuses device ones). sample_all: sampling may read the
    # device (each decoding step reads its tokens, EOS checks); only the training passes are held to one read.
    host_values = uncounted(host.host_values)

    build = optim.build_optimizer
    built: list[int] = []

    def build_and_hook(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = build(*args, **kwargs)
        if not built:  # the policy's (PPO's critic optimizer steps with it)
            optimizer.register_step_post_hook(lambda *_: at_steps.append(calls[0]))
        built.append(1)
        return optimizer

    with contextlib.ExitStack() as stack:
        for name in CONVERSIONS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, counted(name)))
        for module in ("posttrain.training.offline", "posttrain.training.online"):
            stack.enter_context(mock.patch(f"{module}.build_optimizer", build_and_hook))
        for module in USING_HOST_VALUES:
            stack.enter_context(mock.patch(f"{module}.host_values", host_values))
        stack.enter_context(mock.patch("posttrain.training.online.sample_all", uncounted(online.sample_all)))
        yield at_steps


def reads_between_steps(at_steps: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(at_steps)]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("dpo", {"reference": {"kind": "cached"}}),
        ("dpo", {"reference": {"kind": "copy"}, "micro_batch_size": 2}),
        ("simpo", {"layout": "padded"}),
        ("kto", {}),
        ("sft", {"packing": True}),
        ("reward", {}),
    ],
)
def test_offline_step_reads_the_device_once(
    method: str, extra: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    config = run_config(method, tiny_model_dir, pairs, tmp_path / "out", max_steps=4, **extra)
    config["data"].pop("eval")
    with counting_reads() as at_steps:
        posttrain.train(config)
    assert len(at_steps) == 4
    assert reads_between_steps(at_steps) == [1, 1, 1]


def run_online(config: dict[str, Any]) -> None:
    from posttrain.config import load

    online.run_online(
        load(config), generator_factory=lambda m, t: ScriptedGenerator(t, ["yes", "no", "maybe"], score_model=m)
    )


@pytest.mark.parametrize(
    ("method", "extra", "steps_per_rollout"),
    [
        ("grpo", {}, 1),
        ("grpo", {"num_iterations": 2, "beta": 0.04}, 2),
        ("rloo", {"beta": 0.05}, 1),
        ("ppo", {"beta": 0.02, "ppo_epochs": 2, "num_mini_batches": 2}, 4),
    ],
)
def test_online_training_passes_read_the_device_once(
    method: str, extra: dict[str, Any], steps_per_rollout: int, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Sampling aside, a rollout step reads the device once: after its passes (PPO's epochs and minibatches
    make several optimizer steps in between, with no read)."""
    prompts = tmp_path / "prompts.jsonl"
    write_word_prompts(prompts, 8)
    config: dict[str, Any] = {
        "method": method, "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
        "data": {"train": str(prompts), "max_length": 64},
        "rewards": [{"name": "regex_format", "pattern": "^yes$", "fullmatch": True}],
        "num_generations": 2, "batch_size": 4, "max_steps": 3, "learning_rate": 1e-3,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "beta": 0.0, **extra,
    }  # fmt: skip
    with counting_reads() as at_steps:
        run_online(config)
    assert len(at_steps) == 3 * steps_per_rollout
    expected = ([0] * (steps_per_rollout - 1) + [1]) * 3
    assert reads_between_steps(at_steps) == expected[: len(at_steps) - 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sync_debug_mode_sees_one_sync_per_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """On a GPU, torch's own sync detector over the same DPO steps (it misses some syncs: the CPU count above
    is the contract; this one catches what Python conversions cannot show, such as boolean indexing)."""
    import warnings

    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    config = run_config("dpo", tiny_model_dir, pairs, tmp_path / "out", max_steps=4, reference={"kind": "cached"})
    config["data"].pop("eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        syncs: list[int] = []  # the warnings so far, at each optimizer step's end

        def build(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
            opt = optim.build_optimizer(*args, **kwargs)
            opt.register_step_post_hook(lambda *_: syncs.append(len(caught)))
            return opt

        with mock.patch("posttrain.training.offline.build_optimizer", build):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                posttrain.train(config)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert reads_between_steps(syncs) == [1, 1, 1], [str(w.message) for w in caught][:10]


def test_host_tensors_go_to_an_accelerator_without_waiting_for_it() -> None:
    """host.to_device: from the host to an accelerator with non_blocking=True (a blocking copy is torch's
    memcpy_and_sync, a stream synchronisation per tensor); plain .to elsewhere (to the host, or already there)."""
    calls: list[dict[str, Any]] = []

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append({"device": str(args[0]), "non_blocking": kwargs.get("non_blocking")})
        return self

    from posttrain.host import to_device

    with mock.patch.object(torch.Tensor, "to", to):
        to_device(torch.zeros(2), torch.device("cuda"))
        to_device(torch.zeros(2), torch.device("cpu"))
    assert calls == [{"device": "cuda", "non_blocking": True}, {"device": "cpu", "non_blocking": False}]
