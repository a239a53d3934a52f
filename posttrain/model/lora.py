"""The one seam to ``peft`` and ``bitsandbytes`` (both imported lazily): LoRA adapters, QLoRA's 4-bit
base, the adapter-disabled reference, merged saving.

With LoRA the base weights never change, so the policy with its adapters switched off IS the starting
model: DPO-style references need no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.model.skeleton import fill_skeleton

if TYPE_CHECKING:  # (imported lazily: posttrain.model.logps and spans import this module, and config them)
    from posttrain.config import LoraConfig, TrainConfig

ADAPTER_FILE = "adapter_model.safetensors"


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ConfigError("lora: needs the peft package: pip install 'posttrain[lora]'") from err
    return peft


def check_quantization(config: TrainConfig) -> None:
    """Refuse, in one line and before anything is loaded or written, what QLoRA (``lora.load_in_4bit``)
    cannot do: run without bitsandbytes, be sharded by FSDP2, or feed its weights to vLLM."""
    lora = config.lora
    if lora is None or not lora.load_in_4bit:
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.load_in_4bit: QLoRA needs the bitsandbytes package: pip install 'posttrain[qlora]'")
    if not torch.cuda.is_available():  # bitsandbytes' 4-bit layers run on CPU from 0.50 on (tested: 0.50.2)
        import importlib.metadata

        version = importlib.metadata.version("bitsandbytes")
        if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (0, 50):
            raise ConfigError(
                f"lora.load_in_4bit: bitsandbytes {version} has no CPU 4-bit layers and there is no CUDA GPU; "
                "pip install 'bitsandbytes>=0.50'"
            )
    if config.distributed.strategy == "fsdp2":
        raise ConfigError(
            "lora.load_in_4bit: not with distributed.strategy: fsdp2 (FSDP2 cannot shard bitsandbytes' packed 4-bit "
            "weights); use ddp: each process holds the 4-bit base, a quarter of its bf16 size"
        )
    if config.generation.backend == "vllm":
        raise ConfigError("lora.load_in_4bit: not with generation.backend: vllm (not wired); use the hf backend")


def four_bit(lora: LoraConfig | None, precision: str, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the frozen base in 4-bit NF4 with double quantization, the
    QLoRA recipe (Dettmers et al. 2023, sections 3-4), straight onto ``device``; ``{}`` without QLoRA.

    Only the linear layers of the decoder are quantized (transformers keeps the output head, embeddings and
    norms in fp32); the 4-bit weights are dequantized to the compute dtype (bf16 under ``precision: bf16``,
    else fp32) for each matmul, and the adapters train in fp32."""
    if lora is None or not lora.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    return {"quantization_config": quantization, "device_map": {"": device}}


def exact_4bit_kernels(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer on its dequantize-then-matmul path.

    On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weights the first time it runs in eval mode
    without gradients, and from then on computes it in bf16 (about 1e-2 relative error): the no-grad
    forwards (the reference, the old policy's log-probs, sampling) would then disagree with the training
    forward, and the PPO ratio would not start at 1. Returns ``model``."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - (a plain attribute of bnb's layer)
    return model


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
    try:
        wrapped: nn.Module = peft.get_peft_model(model, config)
    except ValueError as err:  # peft's errors: no module of the model matches target_modules, one it cannot wrap
        raise ConfigError(f"lora.target_modules: {str(err).splitlines()[0]}") from err
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
    """The model to write as the final one: merged into a plain HF model, or the adapters only."""
    if save == "adapter" or not is_lora(model):
        return model
    return merged(model)


def merged(model: nn.Module) -> nn.Module:
    """A plain transformers model (fp32, no adapters, no quantization) computing what the PEFT model
    ``model`` computes: W + (alpha / r) B A for every adapted layer, with W dequantized first when the base
    is 4-bit (QLoRA). ``model`` is left as it was.

    Merging into the dequantized base, not into the original full-precision weights, keeps the function the
    adapters were trained with (they learnt to correct the quantized W). peft's own ``merge_and_unload``
    would quantize the merged weight again (4-bit in, 4-bit out) and, on a full-precision base, needs a
    deep copy of the whole model first; here the new model is built empty (meta device) and filled on the
    CPU. From a model on the CPU it takes the unchanged tensors (embeddings, norms, heads) as they are, so
    only the merged and dequantized layers are new memory; a model on an accelerator is copied to the CPU,
    so no second, full-precision copy is built there. Its ``generation_config`` is the trained model's.
    """
    inner = base_model(model)
    config = copy.deepcopy(inner.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain: nn.Module = type(inner)._from_config(config, dtype=torch.float32)  # type: ignore[attr-defined]
    if getattr(inner, "generation_config", None) is not None:  # sampling defaults, extra EOS ids
        plain.generation_config = copy.deepcopy(inner.generation_config)
    state = {key: _merged_tensor(inner, key) for key in plain.state_dict()}
    fill_skeleton(plain, state, lambda owner, name: _plain(_source(inner, owner).get_buffer(name)))
    return plain.eval().requires_grad_(False)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU (a merged model is built to be saved: no second copy on the accelerator), floats in fp32."""
    tensor = tensor.detach().to("cpu")
    return tensor.float() if tensor.is_floating_point() else tensor


def _source(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` (a plain model's name) inside a PEFT-wrapped ``root``, seen through peft's
    ``modules_to_save`` wrappers (to the trained copy). An adapted layer comes back as peft's adapter layer."""
    module = root
    for part in path.split(".") if path else ():
        module = getattr(module, part)
        if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):  # what its forward runs
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            off = getattr(module, "disable_adapters", False) or not active
            module = module.original_module if off else module.modules_to_save[active[0]]
    return module


def _merged_tensor(inner: nn.Module, key: str) -> torch.Tensor:
    """The plain model's tensor ``key``: dequantized when 4-bit, with the active adapters' deltas added."""
    owner, _, name = key.rpartition(".")
    module = _source(inner, owner)
    adapted = callable(getattr(module, "get_delta_weight", None))
    value = getattr(module.get_base_layer() if adapted else module, name)  # type: ignore[operator]
    if getattr(value, "quant_state", None) is not None:  # a bitsandbytes 4-bit weight
        import bitsandbytes.functional as bnb_functional

        value = bnb_functional.dequantize_4bit(value.data, value.quant_state)
    value = _plain(value)
    if adapted and name == "weight" and not getattr(module, "disable_adapters", False):
        for active in module.active_adapters:  # type: ignore[union-attr]
            if active in module.lora_A:  # type: ignore[operator]
                value = value + _plain(module.get_delta_weight(active))  # type: ignore[operator]
    return value
