"""Supervised fine-tuning on demonstrations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from posttrain.algorithms.base import Algorithm


@dataclass(frozen=True)
class SFT(Algorithm):
    """Token-level NLL on the assistant's tokens (``completion_only``) or on every token."""

    name: ClassVar[str] = "sft"
    data_kind: ClassVar[str] = "sft"
    needs_reference: ClassVar[bool] = False
    # 2e-5: the usual full fine-tuning rate for small chat models (e.g. Zephyr's and SmolLM2's SFT recipes).
    default_learning_rate: ClassVar[float] = 2e-5
    completion_only: bool = True
    packing: bool = False
    """Pack each micro-batch's examples into rows of up to ``data.max_length`` tokens (no padding between
    them, no attention across them: span attention, one causal call per example, under ``layout: auto`` or
    ``packed``; transformers' block-diagonal mask from the position resets where span attention is not
    exact)."""
