"""The tiny fixtures are deterministic, round-trip through plain transformers, and set the traps we test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import assert_close_for_device
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from posttrain.fixtures import (
    ARCHS,
    CHAT_TEMPLATES,
    SPECIAL_TOKENS,
    build_model,
    build_tokenizer,
    main,
    save_tiny,
)

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19."},
]


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(text, str)
    return text


TEXT = "What is 12 + 7? 12 + 7 = 19. The cat sees a dog.\nHello, world!"


@pytest.mark.parametrize("chat_template", CHAT_TEMPLATES)
def test_tokenizer_is_deterministic(chat_template: str | None) -> None:
    first, second = build_tokenizer(chat_template), build_tokenizer(chat_template)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 512


@pytest.mark.parametrize("arch", ARCHS)
def test_model_is_deterministic_and_leaves_global_rng_alone(tiny_tokenizer: PreTrainedTokenizerFast, arch: str) -> None:
    rng_before = torch.random.get_rng_state()
    first, second = build_model(tiny_tokenizer, arch), build_model(tiny_tokenizer, arch)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, tensor in first_state.items():
        assert torch.equal(tensor, second_state[name]), name
    other = build_model(tiny_tokenizer, arch, seed=1).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], first_state["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_model_is_tiny_fp32_and_sized_to_tokenizer(tiny_tokenizer: PreTrainedTokenizerFast, arch: str) -> None:
    model = build_model(tiny_tokenizer, arch)
    assert model.dtype == torch.float32 and model.training
    assert 30_000 < sum(p.numel() for p in model.parameters()) < 300_000
    config = model.config
    assert config.vocab_size == len(tiny_tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tiny_tokenizer.pad_token_id,
        tiny_tokenizer.bos_token_id,
        tiny_tokenizer.eos_token_id,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_dir_reloads_with_plain_transformers(tmp_path: Path, arch: str) -> None:
    # qwen2 matters most: transformers 5 reloads it as Qwen2Tokenizer, which rebuilds the pre-tokenizer.
    path = save_tiny(tmp_path / arch, chat_template="chatml", arch=arch)
    tokenizer, model = build_tokenizer("chatml"), build_model(build_tokenizer("chatml"), arch)
    loaded_tokenizer = AutoTokenizer.from_pretrained(path)
    loaded_model = AutoModelForCausalLM.from_pretrained(path)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert render(loaded_tokenizer, MESSAGES) == render(tokenizer, MESSAGES)
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    input_ids = torch.tensor([tokenizer(TEXT).input_ids])
    with torch.no_grad():
        # (bit for bit on a CPU; the H200 machine's gemma2 logits differed there by float noise)
        assert_close_for_device(loaded_model(input_ids).logits, model(input_ids).logits, msg=arch)


def test_session_fixtures_agree(tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    assert (tiny_model_dir / "model.safetensors").is_file()
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert loaded(TEXT).input_ids == tiny_tokenizer(TEXT).input_ids
    assert loaded.chat_template == tiny_tokenizer.chat_template


def test_typical_text_tokenizes_compactly_and_round_trips(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tiny_tokenizer(TEXT).input_ids
    assert len(ids) < 0.8 * len(TEXT.encode())
    assert tiny_tokenizer.decode(ids) == TEXT
    for token in SPECIAL_TOKENS:
        assert len(tiny_tokenizer(token, add_special_tokens=False).input_ids) == 1, token


def test_chatml_template_and_no_added_bos() -> None:
    tokenizer = build_tokenizer("chatml")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert render(tokenizer, MESSAGES) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
        "<|im_start|>assistant\n12 + 7 = 19.<|im_end|>\n"
    )
    assert render(tokenizer, MESSAGES[:2], add_generation_prompt=True).endswith(
        "What is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer("hi", add_special_tokens=True).input_ids == tokenizer("hi", add_special_tokens=False).input_ids


def test_llama_template_writes_bos_so_adding_special_tokens_doubles_it() -> None:
    """Why callers tokenize rendered chats with ``add_special_tokens=False``."""
    tokenizer = build_tokenizer("llama")
    bos = tokenizer.bos_token_id
    text = render(tokenizer, MESSAGES[1:])
    assert text == "<s>[user]\nWhat is 12 + 7?</s>[assistant]\n12 + 7 = 19.</s>"
    assert text.count("<s>") == 1
    prompt = render(tokenizer, MESSAGES[1:2], add_generation_prompt=True)
    assert prompt.endswith("</s>[assistant]\n")
    doubled = tokenizer(text, add_special_tokens=True).input_ids
    assert doubled[:2] == [bos, bos] and doubled[2] != bos
    single = tokenizer(text, add_special_tokens=False).input_ids
    assert single[0] == bos and single[1] != bos
    assert tokenizer("hi").input_ids[0] == bos


def test_base_tokenizer_adds_bos_and_has_no_template() -> None:
    tokenizer = build_tokenizer(None)
    assert tokenizer.chat_template is None
    assert tokenizer("hi").input_ids == [
        tokenizer.bos_token_id,
        *tokenizer("hi", add_special_tokens=False).input_ids,
    ]
    with pytest.raises(ValueError, match="chat_template"):
        render(tokenizer, MESSAGES)


@pytest.mark.parametrize("chat_template", CHAT_TEMPLATES)
def test_pad_is_distinct_from_eos(chat_template: str | None) -> None:
    tokenizer = build_tokenizer(chat_template)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_gemma2_softcaps_logits(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    model = build_model(tiny_tokenizer, "gemma2")
    assert model.config.final_logit_softcapping == 5.0
    assert model.config.attn_logit_softcapping is not None
    # Same seed, so the same weights: the capped logits are exactly cap * tanh(raw / cap).
    cap = 0.25
    capped = build_model(tiny_tokenizer, "gemma2", final_logit_softcapping=cap)
    raw = build_model(tiny_tokenizer, "gemma2", final_logit_softcapping=None)
    input_ids = torch.tensor([tiny_tokenizer(TEXT).input_ids])
    with torch.no_grad():
        capped_logits, raw_logits = capped(input_ids).logits, raw(input_ids).logits
    assert raw_logits.abs().max() > cap
    assert torch.equal(capped_logits, torch.tanh(raw_logits / cap) * cap)


def test_unknown_options_are_rejected(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="chat_template"):
        build_tokenizer("vicuna")
    with pytest.raises(ValueError, match="arch"):
        build_model(tiny_tokenizer, "gpt2")


def test_command_line_writes_a_loadable_model(tmp_path: Path) -> None:
    main([str(tmp_path / "out"), "--arch", "qwen2", "--chat-template", "none"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template is None
