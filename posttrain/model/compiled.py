"""``compile``: the decoder layers of the policy through ``torch.compile``, attention left outside the graph.

What is compiled: each decoder layer's forward (norms, projections, rotary embedding, MLP; fused kernels
and fewer launches on a GPU). The layers share one code object, so one compiled graph serves them all.
What is not: the attention call itself. posttrain's span attention carries Python structures (each row's
blocks; the mask built once per micro-batch) that ``torch.compile`` would turn into guards, recompiling
at every batch until it gives up and falls back to eager without a word. Span attention is therefore
marked ``torch.compiler.disable`` (:func:`posttrain.model.spans.span_attention_forward`): the graph breaks
around it, and FlexAttention is compiled on its own (posttrain/model/span_mask.py). Lengths vary from batch
to batch: torch recompiles once with a dynamic length after the first new shape, and
tests/test_compile.py holds a run of varied lengths to a small number of compilations.

``compile: auto`` is off everywhere for now: on the 2-core CPU it was measured not to pay (benchmarks/
README.md: a training step 1.32 -> 1.41 s after 78 s of compiling); on CUDA it awaits its measurement on
the GPU benchmark (benchmarks/gpu_check.sh). ``compile: true`` turns it on for the offline methods; the
online methods refuse it (sampling runs the same layers with a KV cache of a new length every token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from posttrain.model.lora import base_model

BACKEND = "inductor"
"""torch.compile's backend (tests count recompilations with the ``eager`` backend, which compiles nothing)."""
AUTO_ON_CUDA = False
"""What ``compile: auto`` means on CUDA (False until measured on a GPU: see the module docstring)."""


def wanted(setting: Any, device: torch.device) -> bool:
    """Whether ``compile: setting`` compiles on ``device``."""
    if setting == "auto":
        return device.type == "cuda" and AUTO_ON_CUDA
    return bool(setting)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's layer list of a transformers causal LM (``model.model.layers`` and the like), or None."""
    inner: Any = base_model(model)
    decoder = inner.get_decoder() if callable(getattr(inner, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def compile_layers(model: nn.Module) -> None:
    """Compile each decoder layer of ``model`` in place (``nn.Module.compile``); ``ValueError`` when the model
    has no layer list to compile."""
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"compile: true needs a decoder with a `layers` list; {type(model).__name__} has none")
    for layer in layers:
        layer.compile(backend=BACKEND)


__all__ = ["compile_layers", "decoder_layers", "wanted"]
