"""posttrain's decoding loop (posttrain.rollout.decode): the same distribution as transformers' sampling, a
prompt prefilled once for all its samples, and ``model.generate`` for the models it cannot drive.

Greedy equality with ``generate`` and a hand-written argmax loop, EOS, padding, PEFT and seeding are tested
for both loops in tests/test_generate.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from posttrain.fixtures import build_model
from posttrain.rollout.decode import decode, decode_obstacle, draw, filter_logits
from posttrain.rollout.generate import HFGenerator, SamplingParams

SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.9), (1.0, 1, 1.0), (1.0, 0, 1e-6)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_filtering_is_transformers_temperature_then_top_k_then_top_p(
    temperature: float, top_k: int, top_p: float
) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())  # type: ignore[arg-type]
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)  # type: ignore[arg-type]
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)  # type: ignore[arg-type]
    ours = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(expected, -1), rtol=1e-6, atol=1e-7)
    kept = (~torch.isinf(ours)).sum(-1)
    assert bool((kept >= 1).all()) and (not top_k or bool((kept <= top_k).all()))


def test_draws_follow_the_filtered_distribution() -> None:
    """20,000 draws from 4 rows of fixed logits: frequencies within 0.015 of the probabilities (the standard
    error is at most 0.0035 per token), never a token that top-k removed."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0, -5.0]]).repeat(4, 1)
    probs = torch.softmax(filter_logits(logits, 0.7, top_k=4), -1)[0]
    torch.manual_seed(0)
    counts = Counter(draw(logits.repeat(5000, 1), 0.7, top_k=4).tolist())
    freq = torch.tensor([counts[i] for i in range(6)], dtype=torch.float64) / 20_000
    assert counts[5] == counts[3] == 0
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.015)
    # (temperature 1 would be off by more than that: the test tells temperatures apart)
    assert float((torch.softmax(filter_logits(logits, 1.0, top_k=4), -1)[0] - probs).abs().max()) > 0.05
    assert draw(logits, 0.0).tolist() == [4, 4, 4, 4]  # temperature 0: argmax


def test_a_prompt_is_prefilled_once_for_its_samples(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """5 rows of two prompts (3 + 2 samples): the prefill forward sees 2 rows, every decoding step 5."""
    model = build_model(tiny_tokenizer, initializer_range=0.5).eval()
    a = tiny_tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"]
    b = tiny_tokenizer("Hello!", add_special_tokens=False)["input_ids"]
    rows_seen: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: rows_seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    with torch.no_grad():
        out = decode(model, [a, a, a, b, b], 4, 0.0, 0, 1.0, [tiny_tokenizer.eos_token_id], 0)
    assert rows_seen[0] == (2, len(a)) and all(shape == (5, 1) for shape in rows_seen[1:])
    assert len(rows_seen) == 4 and len(out) == 5 and out[0] == out[1] == out[2] and out[3] == out[4]


def test_models_it_cannot_drive_sample_with_generate(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    from transformers import MambaConfig, MambaForCausalLM, T5Config, T5ForConditionalGeneration

    assert decode_obstacle(build_model(tiny_tokenizer)) is None
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    assert decode_obstacle(t5) == "not a decoder-only transformers model"
    mamba = MambaForCausalLM(MambaConfig(vocab_size=len(tiny_tokenizer), hidden_size=8, num_hidden_layers=1,
                                         state_size=4, expand=2))  # fmt: skip
    reason = decode_obstacle(mamba)
    assert reason is not None and "Mamba" in reason
    generator = HFGenerator(mamba, tiny_tokenizer)
    assert not generator.own_loop  # model.generate samples
    prompt = tiny_tokenizer("Hello!", add_special_tokens=False)["input_ids"]
    rollout = generator.generate([prompt], 2, SamplingParams(3, 0.0), seed=0)
    assert len(rollout.completion_ids) == 2 and all(1 <= len(c) <= 3 for c in rollout.completion_ids)
