"""``deterministic: true``: the key, the switches it sets and puts back, cuBLAS's setting (refused in one line
when CUDA started without it), a CPU run unchanged by it, and the CUDA generators' state in checkpoints."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from support import first_bundled_pairs, run_config
from transformers import AutoModelForCausalLM

import posttrain
from posttrain import determinism
from posttrain.cli import main
from posttrain.config import ConfigError, load
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.pipeline import run_pipeline
from posttrain.training import checkpoint
from posttrain.training.metrics import read_metrics
from posttrain.training.optim import build_optimizer, build_scheduler

VARIABLE = determinism.CUBLAS_VARIABLE


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def switches() -> tuple[bool, bool, bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )


def cuda_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process "has initialised CUDA" (the check the refusal makes), on any machine."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)


# --------------------------------------------------------------------------------------------- the key


def test_the_key_is_a_typed_bool_defaulting_to_false(tmp_path: Path) -> None:
    base = run_config("dpo", tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "out")
    assert load(base).deterministic is False
    assert load({**base, "deterministic": True}).deterministic is True
    assert load(base, ["deterministic=true"]).deterministic is True
    with pytest.raises(ConfigError, match=r"^deterministic: expected true or false, got 'yes'$"):
        load({**base, "deterministic": "yes"})
    with pytest.raises(ConfigError, match=r"^deterministic: expected true or false, got 1$"):
        dataclasses.replace(load(base), deterministic=1)
    assert load(load({**base, "deterministic": True}).to_dict()).deterministic is True


# ------------------------------------------------------------------------------------------ the switches


def test_configure_sets_the_switches_and_cublas_and_puts_the_switches_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VARIABLE, raising=False)
    before = switches()
    determinism.configure(True)
    assert switches() == (True, False, True, False)
    assert os.environ[VARIABLE] == ":4096:8"
    determinism.configure(True)  # a second deterministic run (a pipeline's next stage): no change
    assert switches() == (True, False, True, False)
    determinism.configure(False)
    assert switches() == before
    determinism.configure(False)  # nothing to put back
    assert switches() == before


def test_a_process_own_setting_comes_back_after_a_deterministic_run() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    try:
        determinism.configure(True)
        assert switches() == (True, False, True, False)
        determinism.configure(False)
        assert switches()[:2] == (True, True) and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


def test_a_deterministic_cublas_value_already_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, ":16:8")
    determinism.configure(True)
    assert os.environ[VARIABLE] == ":16:8"


def test_refused_in_one_line_once_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_started(monkeypatch)
    monkeypatch.delenv(VARIABLE, raising=False)
    with pytest.raises(ConfigError) as info:
        determinism.configure(True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("deterministic: true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts")
    assert "(CUBLAS_WORKSPACE_CONFIG unset)" in message
    assert switches()[0] is False  # nothing was switched
    monkeypatch.setenv(VARIABLE, ":0:0")
    with pytest.raises(ConfigError, match=r"\(CUBLAS_WORKSPACE_CONFIG ':0:0'\)"):
        determinism.configure(True)
    monkeypatch.setenv(VARIABLE, ":4096:8")  # exported before Python started: in time
    determinism.configure(True)
    assert switches()[0] is True
    determinism.configure(False)  # (no refusal: nothing to set up)


def test_the_cli_refuses_before_anything_is_written(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    out = tmp_path / "out"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config("dpo", tiny_model_dir, pairs_file, out, deterministic=True)))
    cuda_started(monkeypatch)
    monkeypatch.delenv(VARIABLE, raising=False)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain: error: deterministic: true needs CUBLAS_WORKSPACE_CONFIG") and "\n" not in err
    assert not out.exists()


def test_a_pipeline_sets_cublas_up_before_its_first_stage(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the second stage is deterministic, but CUDA would start in the first: refused up front, naming it."""
    config = {
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(pairs_file), "max_length": 64, "max_prompt_length": 40},
        "stages": [{"name": "sft", "method": "sft", "max_steps": 1},
                   {"method": "dpo", "max_steps": 1, "deterministic": True}],
    }  # fmt: skip
    cuda_started(monkeypatch)
    monkeypatch.delenv(VARIABLE, raising=False)
    with pytest.raises(ConfigError, match=r"^stages\[1\] \(1-dpo\): deterministic: true needs CUBLAS_WORKSPACE_CONFIG"):
        run_pipeline(config)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ runs


def test_a_deterministic_cpu_run_is_the_default_run(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """On a CPU the switches change no bit of what is trained; they stay on until a run without them."""
    extra = {"max_steps": 3, "micro_batch_size": 4}
    det = posttrain.train(run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "det", deterministic=True, **extra))
    assert switches() == (True, False, True, False)
    default = posttrain.train(run_config("dpo", tiny_model_dir, pairs_file, tmp_path / "default", **extra))
    assert switches()[0] is False
    a = AutoModelForCausalLM.from_pretrained(default.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(det.model_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    losses = lambda r: [m["loss"] for m in read_metrics(r.metrics_path) if m["split"] == "train"]  # noqa: E731
    assert losses(det) == losses(default)


def test_an_online_run_samples_under_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    """GRPO with posttrain's decoding loop (its cumulative sums go through determinism.cumsum): the same
    samples, rewards and losses as without the switches, on a CPU."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Question {i}: say yes."}}\n' for i in range(4)))
    figures = []
    for name, det in (("det", True), ("default", False)):
        cfg = run_config("grpo", tiny_model_dir, prompts, tmp_path / name, max_steps=2, batch_size=2,
                         num_generations=2, beta=0.04, deterministic=det,
                         rewards=[{"name": "regex_format", "pattern": "yes"}],
                         generation={"max_new_tokens": 6, "top_p": 0.9})  # fmt: skip
        cfg["data"] = {"train": str(prompts), "max_length": 64}
        result = posttrain.train(cfg)
        figures.append([(m["reward"], m["completion_length"], m["loss"]) for m in read_metrics(result.metrics_path)])
    assert figures[0] == figures[1] and len(figures[0]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cumsum_on_cuda_under_deterministic_algorithms() -> None:
    x = torch.rand(4, 1000, dtype=torch.float64, device="cuda")
    determinism.configure(True)
    with pytest.raises(RuntimeError, match="cumsum"):
        x.cumsum(-1)  # torch has no deterministic CUDA kernel for it
    assert torch.equal(determinism.cumsum(x, -1).cpu(), x.cpu().cumsum(-1))


# ----------------------------------------------------------------------------- the CUDA generators' state


def test_rng_state_holds_the_cuda_generators_once_cuda_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in checkpoint.rng_state()  # (asking would start CUDA)
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    cuda_started(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    assert checkpoint.rng_state()["cuda"] is states


def test_a_checkpoint_round_trips_every_generator(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU and Python generators, and (faked here) two GPUs' states: saved, read back, restored to the GPUs the
    resuming process sees (one here)."""
    model = load_causal_lm(str(tiny_model_dir))
    optimizer = build_optimizer(model, 1e-3, (0.9, 0.999), 1e-8, 0.0)
    scheduler = build_scheduler(optimizer, 10, 0.0, "constant")
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    with monkeypatch.context() as m:
        cuda_started(m)
        m.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
        torch.manual_seed(7)
        random.seed(7)
        saved = checkpoint.save_checkpoint(
            tmp_path, 1, model, load_tokenizer(str(tiny_model_dir)), optimizer.state_dict(), scheduler, {}
        )
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    state = checkpoint.load_state(saved)
    assert [t.dtype for t in state["cuda"]] == [torch.uint8] * 2
    assert all(torch.equal(a, b) for a, b in zip(state["cuda"], states, strict=True))
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    checkpoint.restore_rng(state)
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], states[0])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    del state["cuda"]  # a checkpoint written on a CPU leaves the GPUs' generators alone
    checkpoint.restore_rng(state)
    assert len(restored) == 1
