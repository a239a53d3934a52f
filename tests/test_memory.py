"""Peak memory figures (posttrain.training.memory): RSS everywhere, the CUDA allocator's peaks on a GPU run, in
summary.json, in every metrics.jsonl train line and in the progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import ON_CUDA, first_bundled_pairs, run_config

import posttrain
from posttrain.config import load
from posttrain.rollout.generate import ScriptedGenerator
from posttrain.training import memory
from posttrain.training.metrics import read_metrics
from posttrain.training.online import run_online

GPU_KEYS = {"peak_gpu_allocated_gb", "peak_gpu_reserved_gb"}


def test_a_cpu_device_reports_rss_alone() -> None:
    figures = memory.peak_memory(torch.device("cpu"))
    assert set(figures) == {"peak_rss_gb"} and 0 < figures["peak_rss_gb"] < 1024
    assert memory.shown(figures) == {"rss": f"{figures['peak_rss_gb']:.2f}G"}


def test_a_cuda_device_adds_the_allocator_peaks_in_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: asked.append(d) or 13.6 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: asked.append(d) or 14.1 * 2**30 + 2**20)
    cuda = torch.device("cuda", 1)
    figures = memory.peak_memory(cuda)
    assert asked == [cuda, cuda]
    assert (figures["peak_gpu_allocated_gb"], figures["peak_gpu_reserved_gb"]) == (13.6, 14.1)
    assert memory.shown(figures)["gpu"] == "13.60/14.10G"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reading_the_cuda_peaks_does_not_synchronise() -> None:
    x = torch.randn(1024, 1024, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        (x @ x).sum()
        figures = memory.peak_memory(x.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert figures["peak_gpu_allocated_gb"] <= figures["peak_gpu_reserved_gb"]


def assert_memory_figures(figures: dict[str, object]) -> None:
    assert isinstance(figures["peak_rss_gb"], float) and figures["peak_rss_gb"] > 0
    assert GPU_KEYS & set(figures) == (GPU_KEYS if ON_CUDA else set()), figures  # absent on a CPU run


def test_offline_and_online_runs_report_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    result = posttrain.train(run_config("dpo", tiny_model_dir, pairs, tmp_path / "dpo", max_steps=2, logging_steps=2))
    train = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert [m["step"] for m in train] == [2]
    for figures in (result.summary, json.loads((result.output_dir / "summary.json").read_text()), *train):
        assert_memory_figures(figures)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Question {i}: say yes."}}\n' for i in range(4)))
    cfg = run_config("grpo", tiny_model_dir, prompts, tmp_path / "grpo", max_steps=2, batch_size=2, num_generations=2,
                     beta=0.0, rewards=[{"name": "regex_format", "pattern": "yes"}])  # fmt: skip
    cfg["data"] = {"train": str(prompts), "max_length": 64}
    online = run_online(load(cfg), generator_factory=lambda m, t: ScriptedGenerator(t, ["yes", "no"]))
    train = [m for m in read_metrics(online.metrics_path) if m["split"] == "train"]
    assert len(train) == 2
    for figures in (online.summary, *train):
        assert_memory_figures(figures)
