"""Session-wide tiny fixtures, built once from a fixed seed (see :mod:`posttrain.fixtures`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from posttrain import determinism
from posttrain.fixtures import build_tokenizer, save_tiny

# Runs with `deterministic: true` (support.BIT_EXACT on a CUDA machine) need cuBLAS's setting before the first
# test starts CUDA; it changes no result of the other tests.
os.environ.setdefault(determinism.CUBLAS_VARIABLE, determinism.CUBLAS_DETERMINISTIC[0])


@pytest.fixture(autouse=True)
def _determinism_switches_put_back() -> Iterator[None]:
    """A test's deterministic run leaves torch's switches as the next test expects to find them."""
    yield
    determinism.configure(False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved chatml tokenizer + llama model, loadable with ``from_pretrained``. Treat as read-only."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama-chatml", chat_template="chatml", arch="llama")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The chatml tokenizer, shared by the session: do not mutate it (``copy.deepcopy`` it first)."""
    return build_tokenizer("chatml")
