"""The one seam to ``peft`` (imported lazily): LoRA adapters, the adapter-disabled reference, saving.

With LoRA the base weights never change, so the policy with its adapters switched off IS the starting
model: DPO-style references need no second copy of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # (imported lazily: posttrain.model.logps and spans import this module, and config them)
    from posttrain.config import LoraConfig

ADAPTER_FILE = "adapter_model.safetensors"


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        from posttrain.config import ConfigError

        raise ConfigError("lora: needs the peft package: pip install 'posttrain[lora]'") from err
    return peft


def check_quantization(lora: LoraConfig | None) -> None:
    """Refuse QLoRA (``lora.load_in_4bit``) in one line, before anything is loaded or written: it needs a
    CUDA GPU and bitsandbytes, and even with both the 4-bit base is not wired into the loops yet."""
    if lora is None or not lora.load_in_4bit:
        return
    import importlib.util

    import torch

    from posttrain.config import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("lora.load_in_4bit: QLoRA needs a CUDA GPU (and bitsandbytes); this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.load_in_4bit: QLoRA needs the bitsandbytes package: pip install bitsandbytes")
    raise ConfigError("lora.load_in_4bit: QLoRA is not wired into the training loops yet; use plain LoRA")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model a PEFT wrapper wraps (PeftModel -> LoraModel -> model; the LoRA layers live
    inside it), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_lora(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


def apply_lora(model: nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` with fresh adapters (B = 0: the wrapped model starts equal to the base)."""
    peft = _peft()
    targets: str | list[str] = lora.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type=task_type
    )
    wrapped: nn.Module = peft.get_peft_model(model, config)
    return wrapped


def adapters_off(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A context-manager factory that runs ``model`` with its adapters disabled (the reference)."""

    def context() -> contextlib.AbstractContextManager[Any]:
        return model.disable_adapter()  # type: ignore[operator]

    return context


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield


def load_adapter_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load the adapter weights of a LoRA checkpoint into an already wrapped model (resume)."""
    from safetensors.torch import load_file

    _peft().set_peft_model_state_dict(model, load_file(str(checkpoint / ADAPTER_FILE)))


def for_saving(model: nn.Module, save: str) -> nn.Module:
    """The model to write as the final one: merged into a plain HF model (a copy), or the adapters only."""
    if save == "adapter" or not is_lora(model):
        return model
    import copy

    merged: nn.Module = copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]
    return merged
