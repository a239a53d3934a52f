"""The generator seam: layout, greedy against a hand-written argmax loop, EOS / truncation / stop strings,
seeding, current weights, training mode, and the scripted test double's draw probabilities.

``prefer(model, token, strength)`` edits a tiny llama in place so that its next-token logits are the same at
every position: ``strength`` for ``token`` and 0 for the other ``V - 1`` tokens. (Attention and MLP outputs
are zeroed and every embedding is ``1``, so the final RMSNorm gives ``h = 1`` everywhere; the LM head row of
``token`` is ``strength / H`` and every other row 0.) Then ``p(token) = e^s / (e^s + V - 1)`` and every other
token has ``1 / (e^s + V - 1)``: greedy and sampled outputs, and sequence log-probs, are known by hand.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain.fixtures import ARCHS, build_model
from posttrain.rollout.generate import (
    Generator,
    HFGenerator,
    Rollout,
    SamplingParams,
    ScriptedGenerator,
    cut_completion,
)

TEXTS = ["What is 2 + 3?", "Hello!", "The cat sees a book. Then the dog"]  # 8, 2 and 9 tokens: left padding
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)
LOOPS = ("auto", "generate")  # posttrain's decoding loop, transformers' generate
SAMPLE = SamplingParams(max_new_tokens=6, temperature=1.0)


def prompts(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def tiny(tokenizer: PreTrainedTokenizerFast, arch: str = "llama") -> PreTrainedModel:
    """A fresh model whose logits spread over several units, so argmax is never a near-tie."""
    return build_model(tokenizer, arch=arch, initializer_range=0.5)


@torch.no_grad()
def prefer(model: PreTrainedModel, token: int, strength: float) -> None:
    """Make every next-token distribution the same: logit ``strength`` for ``token``, 0 elsewhere."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)
    head = model.lm_head.weight
    head.zero_()
    head[token] = strength / head.shape[1]


@torch.no_grad()
def argmax_loop(model: nn.Module, prompt: list[int], max_new_tokens: int, eos: int) -> tuple[int, ...]:
    """Greedy decoding by hand: full forward on the unpadded prompt, argmax, append, stop after EOS."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        out.append(token)
        if token == eos:
            break
    return tuple(out)


def check_layout(rollout: Rollout, rows: int) -> None:
    assert len(rollout.completion_ids) == len(rollout.texts) == len(rollout.truncated) == rows


def test_sampling_params_are_validated() -> None:
    assert SamplingParams(stop=["\n"]).stop == ("\n",)  # type: ignore[arg-type]  # a YAML list
    for field, value in [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -1), ("stop", ("",))]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_manual_argmax_loop_in_prompt_major_order(
    tiny_tokenizer: PreTrainedTokenizerFast, arch: str, loop: str
) -> None:
    """3 prompts x 2 samples in batches of 3 rows: left padding and batch boundaries change nothing (a
    prompt's two rows share one prefill in posttrain's loop; the second prompt's rows are split over two
    batches)."""
    model = tiny(tiny_tokenizer, arch)
    ids = prompts(tiny_tokenizer)
    generator = HFGenerator(model, tiny_tokenizer, batch_size=3, loop=loop)
    assert generator.own_loop == (loop == "auto")  # (Gemma-2: sliding window and soft-capping included)
    rollout = generator.generate(ids, 2, GREEDY, seed=0)
    check_layout(rollout, 6)
    eos = tiny_tokenizer.eos_token_id
    for i, prompt in enumerate(ids):
        expected = argmax_loop(model, prompt, GREEDY.max_new_tokens, eos)
        for j in range(2):
            assert rollout.completion_ids[i * 2 + j] == expected
            assert rollout.texts[i * 2 + j] == tiny_tokenizer.decode(expected, skip_special_tokens=True)
            assert rollout.truncated[i * 2 + j] == (expected[-1] != eos)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("pad", ["eos", None])
def test_tokenizer_whose_pad_is_eos_or_missing(
    tiny_tokenizer: PreTrainedTokenizerFast, pad: str | None, loop: str
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token if pad == "eos" else None
    model = tiny(tokenizer)
    generator = HFGenerator(model, tokenizer, loop=loop)
    assert generator.pad_id == tokenizer.eos_token_id
    rollout = generator.generate(prompts(tokenizer), 1, GREEDY, seed=0)
    eos = tokenizer.eos_token_id
    assert rollout.completion_ids == [argmax_loop(model, p, GREEDY.max_new_tokens, eos) for p in prompts(tokenizer)]


def test_hub_generation_config_cannot_change_the_distribution(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """A checkpoint's repetition penalty, n-gram ban or top_k would make samples come from another distribution."""
    model = tiny(tiny_tokenizer)
    generator = HFGenerator(model, tiny_tokenizer)
    plain_sample = generator.generate(prompts(tiny_tokenizer), 4, SAMPLE, seed=0)
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.top_k = 1  # would make sampling greedy
    model.generation_config.min_new_tokens = 6  # would forbid EOS
    eos = tiny_tokenizer.eos_token_id
    greedy = generator.generate(prompts(tiny_tokenizer), 1, GREEDY, seed=0)
    assert greedy.completion_ids == [argmax_loop(model, p, GREEDY.max_new_tokens, eos) for p in prompts(tiny_tokenizer)]
    assert generator.generate(prompts(tiny_tokenizer), 4, SAMPLE, seed=0) == plain_sample


@pytest.mark.parametrize("loop", LOOPS)
def test_top_k_one_and_tiny_top_p_sample_the_argmax(tiny_tokenizer: PreTrainedTokenizerFast, loop: str) -> None:
    generator = HFGenerator(tiny(tiny_tokenizer), tiny_tokenizer, loop=loop)
    greedy = generator.generate(prompts(tiny_tokenizer), 2, GREEDY, seed=0).completion_ids
    sampled = generator.generate(prompts(tiny_tokenizer), 2, SAMPLE, seed=0).completion_ids
    assert sampled != greedy  # so the two below are not equal by chance
    for params in [SamplingParams(6, temperature=1.0, top_k=1), SamplingParams(6, temperature=1.0, top_p=1e-6)]:
        assert generator.generate(prompts(tiny_tokenizer), 2, params, seed=0).completion_ids == greedy


@pytest.mark.parametrize("loop", LOOPS)
def test_eos_ends_the_completion_and_is_kept(tiny_tokenizer: PreTrainedTokenizerFast, loop: str) -> None:
    eos = tiny_tokenizer.eos_token_id
    model = tiny(tiny_tokenizer)
    prefer(model, eos, 50.0)
    rollout = HFGenerator(model, tiny_tokenizer, loop=loop).generate(prompts(tiny_tokenizer), 2, GREEDY, seed=0)
    assert rollout == Rollout([(eos,)] * 6, [""] * 6, [False] * 6)
    # p(EOS) = e^6 / (e^6 + 511) = 0.44 per token: in 64 sampled rows of up to 6 tokens some end early, some
    # after a few tokens, some never; rows that ended early in a batch still running must not keep padding.
    prefer(model, eos, 6.0)
    generator = HFGenerator(model, tiny_tokenizer, batch_size=64, loop=loop)
    rollout = generator.generate(prompts(tiny_tokenizer)[:1], 64, SAMPLE, 1)
    lengths = Counter(len(c) for c in rollout.completion_ids)
    assert lengths[1] > 0 and lengths[6] > 0 and len(lengths) > 3
    for ids, truncated in zip(rollout.completion_ids, rollout.truncated, strict=True):
        assert eos not in ids[:-1]
        assert truncated == (ids[-1] != eos)
        assert truncated <= (len(ids) == SAMPLE.max_new_tokens)


def test_max_new_tokens_without_eos_is_flagged_truncated(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    cat = tiny_tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    model = tiny(tiny_tokenizer)
    prefer(model, cat, 50.0)
    rollout = HFGenerator(model, tiny_tokenizer).generate(prompts(tiny_tokenizer), 1, SamplingParams(4, 0.0), seed=0)
    assert rollout == Rollout([(cat,) * 4] * 3, [" cat" * 4] * 3, [True] * 3)


@pytest.mark.parametrize(
    ("stop", "kept"),
    [((" cat cat",), 2), (("at",), 1), (("t c", " cat cat cat"), 2), (("dog",), 5), ((" cat" * 5, "t c"), 2)],
)
def test_stop_strings_cut_after_the_first_one(
    tiny_tokenizer: PreTrainedTokenizerFast, stop: tuple[str, ...], kept: int
) -> None:
    """The model writes " cat" x 5; a completion keeps the fewest tokens whose text holds some stop string."""
    cat = tiny_tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    model = tiny(tiny_tokenizer)
    prefer(model, cat, 50.0)
    params = SamplingParams(5, 0.0, stop=stop)
    rollout = HFGenerator(model, tiny_tokenizer).generate(prompts(tiny_tokenizer)[:1], 1, params, seed=0)
    assert rollout == Rollout([(cat,) * kept], [" cat" * kept], [kept == 5])


def test_cut_completion_by_hand(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """'Yes. No. Maybe' is [Yes . _ N o . _ M ay be]; then EOS (2) and padding (5)."""
    ids = [*tiny_tokenizer("Yes. No. Maybe", add_special_tokens=False)["input_ids"], 2, 5, 5]
    decode = tiny_tokenizer.decode
    assert cut_completion(ids, {2}, (), decode) == (tuple(ids[:11]), False)
    assert cut_completion(ids, {2}, (".",), decode) == (tuple(ids[:2]), False)
    assert cut_completion(ids, {2}, ("Maybe", "No."), decode) == (tuple(ids[:6]), False)  # the earlier one
    assert cut_completion(ids, {2}, ("pad",), decode) == (tuple(ids[:11]), False)  # after EOS: never seen
    assert cut_completion(ids[:7], {2}, ("x",), decode) == (tuple(ids[:7]), True)
    assert cut_completion(ids, {9999}, (), decode) == (tuple(ids), True)


def test_same_seed_same_samples_and_the_callers_rng_is_untouched(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    generator = HFGenerator(tiny(tiny_tokenizer), tiny_tokenizer)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generator.generate(prompts(tiny_tokenizer), 4, SAMPLE, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # the global state does not leak in either
    assert generator.generate(prompts(tiny_tokenizer), 4, SAMPLE, seed=7) == first
    assert generator.generate(prompts(tiny_tokenizer), 4, SAMPLE, seed=8) != first
    samples = first.completion_ids
    assert len(set(samples[:4])) > 1  # the 4 samples of one prompt differ from each other


def test_generation_always_uses_the_current_weights(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = tiny(tiny_tokenizer)
    generator = HFGenerator(model, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    before = generator.generate(prompts(tiny_tokenizer), 1, GREEDY, seed=0).completion_ids
    assert before == [argmax_loop(model, p, GREEDY.max_new_tokens, eos) for p in prompts(tiny_tokenizer)]
    for word in [" dog", " bird"]:  # edited in place, after the generator was built
        token = tiny_tokenizer(word, add_special_tokens=False)["input_ids"][0]
        prefer(model, token, 50.0)
        after = generator.generate(prompts(tiny_tokenizer), 1, GREEDY, seed=0)
        assert after.completion_ids == [(token,) * GREEDY.max_new_tokens] * 3


@pytest.mark.parametrize("training", [True, False])
def test_generates_in_eval_mode_and_restores_each_modules_mode(
    tiny_tokenizer: PreTrainedTokenizerFast, training: bool
) -> None:
    model = tiny(tiny_tokenizer)
    model.train(training)
    model.model.layers[0].eval()  # a submodule in its own mode (e.g. a frozen part) keeps it
    modes = {name: m.training for name, m in model.named_modules()}
    seen: list[bool] = []
    model.model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    grad: list[bool] = []
    model.lm_head.register_forward_pre_hook(lambda module, args: grad.append(torch.is_grad_enabled()))
    HFGenerator(model, tiny_tokenizer).generate(prompts(tiny_tokenizer), 1, GREEDY, seed=0)
    assert seen and not any(seen) and not any(grad)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_both_generators_follow_the_protocol(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    assert isinstance(HFGenerator(tiny(tiny_tokenizer), tiny_tokenizer), Generator)
    assert isinstance(ScriptedGenerator(tiny_tokenizer, ["a"]), Generator)


def test_scripted_uniform_draws_in_prompt_major_order(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """3000 draws of 3 candidates: counts within 3 standard deviations (sqrt(3000 * 1/3 * 2/3) = 25.8)."""
    generator = ScriptedGenerator(tiny_tokenizer, [" cat", " dog", " bird"])
    rollout = generator.generate([[7, 8]], 3000, SAMPLE, seed=0)
    counts = Counter(rollout.texts)
    assert counts == {" cat": 960, " dog": 1028, " bird": 1012}  # Python's random.Random(0)
    assert all(abs(c - 1000) < 3 * 25.8 for c in counts.values())
    assert generator.generate([[7, 8]], 3000, SAMPLE, seed=0) == rollout
    assert rollout.truncated == [False] * 3000
    eos = tiny_tokenizer.eos_token_id
    assert set(rollout.completion_ids) == {(349, eos), (340, eos), (352, eos)}

    def per_prompt(text: str, index: int) -> list[str]:
        return [f"{text} answer {index}"]

    rollout = ScriptedGenerator(tiny_tokenizer, per_prompt).generate(prompts(tiny_tokenizer), 2, SAMPLE, seed=0)
    check_layout(rollout, 6)
    for i, text in enumerate(TEXTS):
        expected = f"{text} answer {i}"
        ids = (*tiny_tokenizer(expected, add_special_tokens=False)["input_ids"], eos)
        assert rollout.texts[2 * i : 2 * i + 2] == [expected] * 2
        assert rollout.completion_ids[2 * i : 2 * i + 2] == [ids] * 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_scripted_draws_follow_the_current_score_model(
    tiny_tokenizer: PreTrainedTokenizerFast, temperature: float
) -> None:
    """With ``prefer(cat, 4)`` the candidates [cat EOS], [dog EOS], [bird EOS] share log p(EOS) and differ in
    their first token: log-probs ``4 - Z``, ``-Z``, ``-Z``, so the draw probabilities are
    ``softmax([4, 0, 0] / T) = [e^(4/T), 1, 1] / (e^(4/T) + 2)``: 0.9647 at T = 1 and 0.7870 at T = 2."""
    model = tiny(tiny_tokenizer)
    generator = ScriptedGenerator(tiny_tokenizer, [" cat", " dog", " bird"], score_model=model, temperature=temperature)
    prompt = prompts(tiny_tokenizer)[0]
    cat, dog = (tiny_tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" cat", " dog"))
    for token, favourite in [(cat, " cat"), (dog, " dog")]:  # edited in place, after the generator was built
        prefer(model, token, 4.0)
        e = math.exp(4.0 / temperature)
        expected = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
        if favourite == " dog":
            expected = [expected[1], expected[0], expected[2]]
        eos = tiny_tokenizer.eos_token_id
        got = generator.probabilities(prompt, [(349, eos), (340, eos), (352, eos)])
        torch.testing.assert_close(
            torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5
        )
        counts = Counter(generator.generate([prompt], 200, SAMPLE, seed=0).texts)
        assert counts.most_common(1)[0][0] == favourite


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
@pytest.mark.parametrize("loop", LOOPS)
def test_peft_model_generates_with_adapters_on(tiny_tokenizer: PreTrainedTokenizerFast, loop: str) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny(tiny_tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"])
    )
    generator = HFGenerator(model, tiny_tokenizer, loop=loop)
    assert generator.own_loop == (loop == "auto")
    with torch.no_grad():  # LoRA B starts at 0 (adapters a no-op); move them after the generator is built
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
    eos = tiny_tokenizer.eos_token_id
    rollout = generator.generate(prompts(tiny_tokenizer), 1, GREEDY, seed=0)
    assert rollout.completion_ids == [
        argmax_loop(model, p, GREEDY.max_new_tokens, eos) for p in prompts(tiny_tokenizer)
    ]
    with model.disable_adapter():
        base = [argmax_loop(model, p, GREEDY.max_new_tokens, eos) for p in prompts(tiny_tokenizer)]
    assert rollout.completion_ids != base
