"""Shared builders for the end-to-end tests: a tiny run's config and the bundled pairs they train on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import posttrain
from posttrain import distributed
from posttrain.training import checkpoint

BUNDLED_TRAIN = Path(posttrain.__file__).parent / "bundled" / "prefs_train.jsonl"

ON_CUDA = distributed.device().type == "cuda"
"""Whether the suite's runs train on a CUDA GPU (posttrain takes the GPU wherever torch sees one)."""

CUDA_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {torch.float32: (1e-4, 1e-5)}
"""(relative, absolute) differences that CUDA's kernels give between two computations of the same float32
figure: they accumulate with atomics (``index_add``, the embedding backward) in an order that changes from
call to call, so a tie at 0 breaks either way and sums differ in their last bits. 1e-4 / 1e-5 is the bound
that every float figure of three optimizer steps met on the H200 (tests/test_layout.py, issue 15); the
differences seen there were ~1e-6."""

BIT_EXACT: dict[str, Any] = {"deterministic": True} if ON_CUDA else {}
"""Config keys of a run that a test compares bit for bit (resume against an uninterrupted run, a DPO
accuracy at a margin tie): ``deterministic: true`` on CUDA (docs/config.md); nothing on a CPU, whose kernels
give the same bits already, so that the suite keeps testing the default there."""


def assert_close_for_device(actual: Any, expected: Any, rel: float = 0.0, abs: float = 0.0, msg: object = "") -> None:
    """``actual`` equals ``expected`` (tensors, numbers or lists of numbers) elementwise within
    ``max(rel * |expected|, abs)``, pytest.approx's rule; by default bit for bit. Where the runs train on a
    CUDA GPU, the bounds are at least :data:`CUDA_TOLERANCE` of the dtype (Python numbers are float32
    figures); on a CPU the assertion is exactly as strict as written."""
    a, e = (x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64) for x in (actual, expected))
    if ON_CUDA:
        dtype = actual.dtype if isinstance(actual, torch.Tensor) else torch.float32
        device_rel, device_abs = CUDA_TOLERANCE[dtype]
        rel, abs = max(rel, device_rel), max(abs, device_abs)
    where = f"{msg}: " if msg != "" else ""
    assert a.shape == e.shape, f"{where}shapes {tuple(a.shape)} and {tuple(e.shape)}"
    a, e = a.detach().cpu().double(), e.detach().cpu().double()  # exact for every float dtype up to 64 bits
    diff = (a - e).abs()
    ok = (a == e) | (diff <= (rel * e.abs()).clamp(min=abs))
    if not bool(ok.all()):
        worst = int(torch.where(ok, torch.zeros_like(diff), diff.nan_to_num(nan=float("inf"))).argmax())
        raise AssertionError(
            f"{where}{int((~ok).sum())} of {ok.numel()} values differ by more than max({rel:g} x |expected|, "
            f"{abs:g}); the largest at flat index {worst}: {a.flatten()[worst].item()!r} vs "
            f"{e.flatten()[worst].item()!r}"
        )


def first_bundled_pairs(path: Path, n: int = 32) -> Path:
    """Write the first ``n`` bundled pairs to ``path``: small enough to train on in a second, learnable."""
    path.write_text("".join(BUNDLED_TRAIN.read_text().splitlines(keepends=True)[:n]))
    return path


def write_word_prompts(path: Path, n: int) -> Path:
    """Write ``n`` prompt rows "Question i: say the word." to ``path`` (the online tests' scripted task)."""
    import json

    path.write_text("".join(json.dumps({"prompt": f"Question {i}: say the word."}) + "\n" for i in range(n)))
    return path


def run_config(
    method: str, model: Path, data: Path, out: Path, eval_file: Path | None = None, **extra: Any
) -> dict[str, Any]:
    """A tiny run: 12 constant-lr steps of 8 examples, evaluated on ``eval_file`` (default: the train data)."""
    config: dict[str, Any] = {
        "method": method,
        "model": str(model),
        "data": {"train": str(data), "eval": str(eval_file or data), "max_length": 64, "max_prompt_length": 40},
        "output_dir": str(out),
        "max_steps": 12,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "seed": 0,
    }
    config.update(extra)
    return config


def assert_plain_transformers_loads(model_dir: Path) -> None:
    """A subprocess with no posttrain import loads ``model_dir`` with AutoModelForCausalLM / AutoTokenizer and
    gets the logits this process gets from the same directory."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}); "
        f"t = AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
        "assert 'posttrain' not in sys.modules\n"
        "print(float(m(**t('What is 2 + 2?', return_tensors='pt')).logits.sum()))"
    )
    plain = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        here = float(model(**tokenizer("What is 2 + 2?", return_tensors="pt")).logits.sum())
    assert abs(plain - here) <= 1e-6 * abs(here), (plain, here)


def killed_after_first_checkpoint(run: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Call ``run`` with the process "killed" (KeyboardInterrupt) right after it writes its first checkpoint,
    as a run stopped there leaves its output_dir; the real ``save_checkpoint`` is back afterwards."""
    save = checkpoint.save_checkpoint

    def save_then_die(*args: Any, **kwargs: Any) -> Path:
        save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the checkpoint")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(checkpoint, "save_checkpoint", save)


def assert_same_causal_lm_run(straight: Any, resumed: Any) -> None:
    """Two runs' final models (plain causal LMs) equal within 1e-7, and their logged training losses equal."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.training.metrics import read_metrics

    a = AutoModelForCausalLM.from_pretrained(straight.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.model_dir).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)
    losses = lambda r: [m["loss"] for m in read_metrics(r.metrics_path) if m["split"] == "train"]  # noqa: E731
    assert losses(resumed) == losses(straight)
