"""A vLLM backend behind the generator seam: :class:`~posttrain.rollout.generate.HFGenerator`'s contract, faster.

vLLM is imported only when a :class:`VLLMGenerator` is built, so posttrain imports (and its tests run) without it.
The engine is colocated: it lives in this process, next to the training model, and ``VLLM_ENABLE_V1_MULTIPROCESSING``
defaults to ``0`` here so that vLLM's V1 engine core stays in-process too; pushing the weights before each rollout is
then an in-process copy instead of a serialisation through a pipe to another process.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from posttrain import distributed
from posttrain.model import load
from posttrain.model.lora import is_lora
from posttrain.rollout.sampling import Rollout, SamplingParams, cut_completion, eos_ids

__all__ = ["VLLMGenerator", "hf_named_weights", "require_vllm"]

_NO_VLLM = "generation.backend: vllm needs the vllm package (pip install vllm) and a CUDA GPU"
_NO_CUDA = "generation.backend: vllm needs a CUDA GPU (torch.cuda.is_available() is False)"


def require_vllm() -> Any:
    """The ``vllm`` module, or a one-line ImportError / RuntimeError when it or a CUDA GPU is missing (the
    loops call this before writing anything, so a run asking for vLLM where it cannot work leaves nothing)."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(_NO_VLLM) from err
    if not torch.cuda.is_available():
        raise RuntimeError(_NO_CUDA)
    return vllm


def hf_named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` under the HF checkpoint's names, the ones vLLM's ``load_weights`` expects.

    For a PEFT model (call it with the adapters merged) peft's ``base_model.model.``, ``.base_layer`` and
    ``modules_to_save.default`` are stripped and the adapter tensors (``lora_*``) skipped. Tied weights come once.
    """
    peft = is_lora(model)
    for name, param in model.named_parameters():
        if peft:
            if ".lora_" in name or ".original_module." in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            name = name.replace(".modules_to_save.default", "")
        yield name, param.detach()


@contextmanager
def _merged(model: nn.Module) -> Iterator[None]:
    """A PEFT model with its adapters merged into the base weights inside, restored exactly afterwards.

    ``unmerge_adapter`` subtracts the delta again, which in bf16 does not give the base back bit for bit. The base
    is the adapters-off reference of DPO-style losses, so a CPU copy of the touched weights is written back instead
    of letting it drift a little on every rollout. Plain models pass through untouched.
    """
    if not is_lora(model):
        yield
        return
    saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if ".base_layer." in n}
    model.merge_adapter()  # type: ignore[operator]
    try:
        yield
    finally:
        model.unmerge_adapter()  # type: ignore[operator]
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


class VLLMGenerator:
    """Samples with a colocated ``vllm.LLM``, always from the training module's CURRENT weights.

    ``model_path``: the HF checkpoint the engine is built from; :meth:`generate` overwrites its weights with the
    module's first, so only its architecture and tokenizer matter. ``dtype`` and ``max_model_len`` go to vLLM as
    they are (its ``"auto"`` may pick fp16 for an fp32 checkpoint). Completions, texts and ``truncated`` follow
    :class:`~posttrain.rollout.generate.HFGenerator`: ids up to and including the first EOS, then cut after the
    first stop string by :func:`cut_completion`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        model_path: str,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        max_model_len: int | None = None,
    ) -> None:
        vllm = require_vllm()
        self.model, self.tokenizer, self._vllm = model, tokenizer, vllm
        self.eos_ids = eos_ids(tokenizer, model)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process (module doc)
        extra: dict[str, Any] = {} if max_model_len is None else {"max_model_len": max_model_len}
        if distributed.world_size() > 1:
            # Under torchrun: one engine per process, on its own GPU (LOCAL_RANK), each sampling its share of
            # the prompts. vLLM's external-launcher executor builds its one worker inside the process group
            # torchrun started instead of starting one of its own (vLLM docs, "torchrun example").
            extra["distributed_executor_backend"] = "external_launcher"
        self.llm: Any = vllm.LLM(
            model=model_path, tokenizer=model_path, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
            enable_prefix_caching=True, trust_remote_code=load.trusted(), **extra,
        )  # fmt: skip

    def push_weights(self) -> None:
        """Load the module's current (PEFT: merged) weights into the engine; drop the prefix cache of the old."""
        with torch.no_grad(), _merged(self.model):
            weights = list(hf_named_weights(self.model))

            def load(engine_model: nn.Module) -> None:  # returns nothing: no tensors travel back
                engine_model.load_weights(weights)  # type: ignore[operator]

            if hasattr(self.llm, "apply_model"):
                # Current vLLM (V0 and V1 engines): run ``load`` on the model inside each worker.
                self.llm.apply_model(load)
            else:
                # Older V0 engines without ``LLM.apply_model``: the single worker's model is reachable directly.
                load(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if callable(reset):
            reset()

    def _sampling_params(self, params: SamplingParams, seed: int) -> Any:
        greedy = params.temperature == 0  # vLLM: temperature 0 is greedy; top_p / top_k then left neutral
        return self._vllm.SamplingParams(
            n=1, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=-1 if greedy or params.top_k == 0 else params.top_k,  # -1 = off in every vLLM (0 only in newer)
            min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0,
            seed=seed, stop_token_ids=list(self.eos_ids), ignore_eos=False,
            stop=list(params.stop) or None, include_stop_str_in_output=True, skip_special_tokens=True,
        )  # fmt: skip

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, params: SamplingParams, seed: int) -> Rollout:
        """``n`` completions of every prompt, prompt-major (sample j of prompt i at ``i * n + j``).

        One request per row, each with its own seed drawn from ``random.Random(seed)``: the same ``seed`` gives
        the same per-request seeds (vLLM does not promise bitwise-equal logits across batch shapes, though), and
        prefix caching lets the ``n`` copies of a prompt reuse its cached prefill.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        self.push_weights()
        rows = [[int(t) for t in p] for p in prompt_ids for _ in range(n)]
        rng = random.Random(seed)
        sampling = [self._sampling_params(params, rng.getrandbits(63)) for _ in rows]
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], sampling_params=sampling, use_tqdm=False)
        if len(outputs) != len(rows):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(rows)} requests")
        eos, completions, truncated = set(self.eos_ids), [], []
        for out in outputs:
            cut, trunc = cut_completion(list(out.outputs[0].token_ids), eos, params.stop, self._decode)
            completions.append(cut)
            truncated.append(trunc)
        return Rollout(completions, [self._decode(c) for c in completions], truncated)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
