"""The vLLM backend without vLLM: import and error messages, then its logic against a fake ``vllm`` module.

The fake ``LLM`` either replays scripted token ids (ordering, EOS, truncation, stop strings, sampling-params
mapping) or, given an engine model, loads pushed weights into it by name, as vLLM's ``load_weights`` does, and
decodes greedily with it: equal to :class:`HFGenerator` on the training model only if the current weights were
pushed under the names the checkpoint uses (PEFT prefixes stripped, adapters merged).
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain.fixtures import build_model
from posttrain.rollout.generate import Generator, HFGenerator, SamplingParams
from posttrain.rollout.vllm import VLLMGenerator, hf_named_weights

ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
Script = Callable[[list[int], Any], list[int]]


class FakeSamplingParams:
    """Records its keyword arguments; rejects ``top_k == 0`` as vLLM releases before 0 meant "off" did."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("top_k", -1) == 0 or kwargs.get("top_k", -1) < -1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {kwargs['top_k']}.")
        self.__dict__.update(kwargs)


class EngineModel:
    """Stands in for the model inside vLLM's worker: ``load_weights`` copies by checkpoint name (KeyError else)."""

    def __init__(self, hf: PreTrainedModel | None) -> None:
        self.hf = hf
        self.loads: list[dict[str, torch.Tensor]] = []  # one {name: tensor} per push

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        self.loads.append({name: t.detach().clone() for name, t in weights})
        if self.hf is not None:
            params = dict(self.hf.named_parameters())
            with torch.no_grad():
                for name, t in weights:
                    params[name].copy_(t)
        return {name for name, _ in weights}


def fake_vllm(monkeypatch: pytest.MonkeyPatch, script: Script | None = None, engine: nn.Module | None = None) -> Any:
    """Installs a fake ``vllm`` (and a CUDA that is "available"); ``module.instances`` collects the LLMs built."""
    module: Any = types.ModuleType("vllm")
    module.instances = []

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs, self.engine, self.resets, self.requests = kwargs, EngineModel(engine), 0, []
            module.instances.append(self)

        def apply_model(self, fn: Callable[[Any], Any]) -> list[Any]:
            return [fn(self.engine)]

        def reset_prefix_cache(self) -> bool:
            self.resets += 1
            return True

        def generate(
            self, prompts: list[dict[str, list[int]]], *, sampling_params: list[Any], use_tqdm: bool
        ) -> list[Any]:
            params = sampling_params
            assert isinstance(params, list) and len(params) == len(prompts) and not use_tqdm
            self.requests.append((prompts, params))
            return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params, strict=True)]

        def _one(self, prompt: list[int], sp: Any) -> Any:
            if script is not None:
                ids = script(prompt, sp)
            else:  # greedy with the engine's own (pushed) weights
                assert self.engine.hf is not None and sp.temperature == 0
                out = self.engine.hf.generate(
                    input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    do_sample=False, max_new_tokens=sp.max_tokens, eos_token_id=sp.stop_token_ids, pad_token_id=0,
                )  # fmt: skip
                ids = out[0, len(prompt) :].tolist()
            ids = ids[: sp.max_tokens]  # vLLM stops at max_tokens and right after a stop token (which it keeps)
            ended = next((i for i, t in enumerate(ids) if t in sp.stop_token_ids), None)
            ids = ids if ended is None else ids[: ended + 1]
            return types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)])

    module.LLM, module.SamplingParams = LLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(ENV, "1")  # recorded, so the generator's setdefault is undone after the test
    monkeypatch.delenv(ENV)
    return module


def tiny(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    return build_model(tokenizer, initializer_range=0.5, seed=seed)  # logits spread: no argmax near-ties


def prompts(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    texts = ["What is 2 + 3?", "Hello!", "The cat sees a book."]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_imports_and_fails_in_one_line_without_vllm(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # ``import vllm`` now raises ImportError
    module = importlib.reload(importlib.import_module("posttrain.rollout.vllm"))
    with pytest.raises(ImportError, match=r"^generation\.backend: vllm needs the vllm package .*GPU$") as info:
        module.VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "unused")
    assert "\n" not in str(info.value)


def test_fails_in_one_line_without_cuda(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    fake = fake_vllm(monkeypatch, script=lambda p, sp: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"^generation\.backend: vllm needs a CUDA GPU") as info:
        VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "unused")
    assert "\n" not in str(info.value) and not fake.instances


def test_engine_settings(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    fake = fake_vllm(monkeypatch, script=lambda p, sp: [])
    gen = VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "/ckpt", gpu_memory_utilization=0.25, max_model_len=99)
    assert isinstance(gen, Generator)
    assert fake.instances[0].kwargs == dict(
        model="/ckpt", tokenizer="/ckpt", gpu_memory_utilization=0.25, dtype="auto", enable_prefix_caching=True,
        trust_remote_code=False, max_model_len=99,
    )  # fmt: skip
    assert os.environ[ENV] == "0"  # colocated: the V1 engine core runs in this process


def test_one_engine_per_torchrun_process(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Under torchrun every process builds its own engine with vLLM's external-launcher executor (its worker
    joins the process group torchrun started; no second one is launched)."""
    from posttrain import distributed

    fake = fake_vllm(monkeypatch, script=lambda p, sp: [])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "/ckpt")
    assert fake.instances[0].kwargs["distributed_executor_backend"] == "external_launcher"


def test_prompt_major_eos_truncation_and_seeds(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    eos = tiny_tokenizer.eos_token_id
    # prompt 0 ends with EOS then would babble on; prompt 1 never ends; prompt 2 ends at once
    scripts = {0: lambda j: [10 + j, 20, eos, 30, 31], 1: lambda j: [40 + j] * 9, 2: lambda j: [eos]}
    by_prompt: dict[tuple[int, ...], int] = {}

    def script(prompt: list[int], sp: Any) -> list[int]:
        index = by_prompt[tuple(prompt)]
        seen = sum(1 for s in seeds if s[0] == index)
        seeds.append((index, sp.seed))
        return scripts[index](seen)

    seeds: list[tuple[int, int]] = []
    fake_vllm(monkeypatch, script=script)
    ps = prompts(tiny_tokenizer)
    by_prompt.update({tuple(p): i for i, p in enumerate(ps)})
    gen = VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "unused")
    out = gen.generate(ps, n=2, params=SamplingParams(max_new_tokens=6), seed=7)
    assert out.completion_ids == [(10, 20, eos), (11, 20, eos), (40,) * 6, (41,) * 6, (eos,), (eos,)]
    assert out.truncated == [False, False, True, True, False, False]
    assert out.texts[4] == "" and out.texts[0] == tiny_tokenizer.decode([10, 20])  # special tokens skipped
    assert [i for i, _ in seeds] == [0, 0, 1, 1, 2, 2]
    assert len({s for _, s in seeds}) == 6  # one seed per request, all different
    first = [s for _, s in seeds]
    seeds.clear()
    gen.generate(ps, n=2, params=SamplingParams(max_new_tokens=6), seed=7)
    assert [s for _, s in seeds] == first  # reproducible from ``seed``
    seeds.clear()
    gen.generate(ps, n=2, params=SamplingParams(max_new_tokens=6), seed=8)
    assert [s for _, s in seeds] != first


def test_stop_strings_cut_like_hf(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tiny_tokenizer("The answer is 5. Then more text", add_special_tokens=False)["input_ids"]
    fake = fake_vllm(monkeypatch, script=lambda p, sp: list(ids))
    gen = VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "unused")
    out = gen.generate([[1, 2]], n=1, params=SamplingParams(max_new_tokens=len(ids), stop=("5.",)), seed=0)
    assert out.texts == ["The answer is 5."] and out.truncated == [False]
    assert tiny_tokenizer.decode(list(out.completion_ids[0])) == "The answer is 5."
    sp = fake.instances[0].requests[0][1][0]
    assert sp.stop == ["5."] and sp.include_stop_str_in_output is True  # vLLM keeps what cut_completion reads
    assert sp.stop_token_ids == gen.eos_ids


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(temperature=0.0, top_p=0.5, top_k=5), dict(temperature=0.0, top_p=1.0, top_k=-1)),
        (SamplingParams(temperature=0.7, top_p=0.9, top_k=0), dict(temperature=0.7, top_p=0.9, top_k=-1)),
        (SamplingParams(temperature=1.0, top_p=1.0, top_k=40), dict(temperature=1.0, top_p=1.0, top_k=40)),
    ],
)
def test_sampling_params_mapping(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast, params: SamplingParams, expected: Any
) -> None:
    fake = fake_vllm(monkeypatch, script=lambda p, sp: [])
    VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "unused").generate([[1]], n=1, params=params, seed=0)
    sp = fake.instances[0].requests[0][1][0]
    assert {k: getattr(sp, k) for k in expected} == expected
    neutral = dict(n=1, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0, min_tokens=0)
    assert {k: getattr(sp, k) for k in neutral} == neutral
    assert sp.max_tokens == params.max_new_tokens and sp.ignore_eos is False and sp.stop is None


def test_every_generate_pushes_the_current_weights(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    model = tiny(tiny_tokenizer)
    fake = fake_vllm(monkeypatch, script=lambda p, sp: [])
    gen = VLLMGenerator(model, tiny_tokenizer, "unused")
    gen.generate([[1]], n=1, params=SamplingParams(), seed=0)
    llm = fake.instances[0]
    assert set(llm.engine.loads[0]) == {n for n, _ in model.named_parameters()} and llm.resets == 1
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    gen.generate([[1]], n=1, params=SamplingParams(), seed=0)
    assert len(llm.engine.loads) == 2 and llm.resets == 2
    assert torch.equal(llm.engine.loads[1]["model.norm.weight"], torch.full_like(model.model.norm.weight, 3.0))
    assert not torch.equal(llm.engine.loads[0]["model.norm.weight"], llm.engine.loads[1]["model.norm.weight"])


def test_v0_fallback_without_apply_model(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    fake = fake_vllm(monkeypatch, script=lambda p, sp: [])
    monkeypatch.delattr(fake.LLM, "apply_model")
    monkeypatch.delattr(fake.LLM, "reset_prefix_cache")
    gen = VLLMGenerator(tiny(tiny_tokenizer), tiny_tokenizer, "unused")
    llm = fake.instances[0]
    llm.llm_engine = types.SimpleNamespace(
        model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=llm.engine))
        )
    )
    gen.generate([[1]], n=1, params=SamplingParams(), seed=0)
    assert len(llm.engine.loads) == 1


def greedy(model: nn.Module, tokenizer: PreTrainedTokenizerFast, ps: Sequence[Sequence[int]]) -> list[Any]:
    return HFGenerator(model, tokenizer).generate(ps, 1, SamplingParams(max_new_tokens=8, temperature=0.0), 0)


def test_greedy_equals_hf_after_weights_change(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    model = tiny(tiny_tokenizer)
    fake_vllm(monkeypatch, engine=tiny(tiny_tokenizer, seed=1))  # other weights until the first push
    gen, ps = VLLMGenerator(model, tiny_tokenizer, "unused"), prompts(tiny_tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert gen.generate(ps, 1, params, 0) == greedy(model, tiny_tokenizer, ps)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    assert gen.generate(ps, 1, params, 0) == greedy(model, tiny_tokenizer, ps)


def test_peft_pushes_merged_weights_under_checkpoint_names(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    pytest.importorskip("peft")
    from posttrain.config import LoraConfig
    from posttrain.model.lora import adapters_off, apply_lora

    base = tiny(tiny_tokenizer)
    policy = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8.0, target_modules="q_proj,v_proj,down_proj"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    fake_vllm(monkeypatch, engine=tiny(tiny_tokenizer, seed=1))
    gen, ps = VLLMGenerator(policy, tiny_tokenizer, "unused"), prompts(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    out = gen.generate(ps, 1, SamplingParams(max_new_tokens=8, temperature=0.0), 0)
    assert out == greedy(policy, tiny_tokenizer, ps)
    with adapters_off(policy)():
        assert out != greedy(policy, tiny_tokenizer, ps)  # the adapters matter, so the merge was really pushed
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # base restored bit for bit
    assert not any(getattr(m, "merged", False) for m in policy.modules())
    assert {n for n, _ in hf_named_weights(policy)} == {n for n, _ in base.named_parameters()}
