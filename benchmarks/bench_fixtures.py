"""Benchmark fixtures: a 4096-token tokenizer, Llama models of fixed sizes, and length-controlled data.

Everything is built locally from fixed seeds (no download), in the style of ``posttrain.fixtures``: the same
byte-level BPE set-up (special tokens, Qwen2-style pre-tokenizer), trained on posttrain's fixture corpus plus
a seeded corpus of pseudo-words so that the vocabulary reaches 4096 entries (posttrain's corpus alone stops
well short of it). Models come from ``posttrain.fixtures.build_model`` and are saved to disk, so that every
tool loads the same weights from the same files.

Text is written with the tokenizer's own single-token words (`` word`` with its leading space), so that a text
of ``k`` words is exactly ``k`` tokens and prompt / completion lengths are what the harness asks for. The
lengths are checked again after tokenization (``check_lengths``).

This module does not import TRL.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from posttrain import fixtures

VOCAB_SIZE = 4096

# Llama-architecture sizes (tie_word_embeddings=False, as posttrain.fixtures builds llama).
SIZES: dict[str, dict[str, int]] = {
    "5m": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4),
    "42m": dict(hidden_size=512, intermediate_size=1376, num_layers=12, num_heads=8),
    # run.py --gpu (issue 15): 316.7M parameters, N = 312.5M
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16),
}

# ChatML as in posttrain.fixtures, except that no newline follows the LAST turn: a completion then ends with
# the EOS token <|im_end|> itself. With posttrain's fixture template ("<|im_end|>\n" after every turn) a
# completion would end with "\n", and TRL's legacy trainers (ORPO, CPO/SimPO) would append one more EOS to it,
# so the two tools would not train on the same tokens. The prompt rendering is a prefix of the full one, as
# posttrain requires. (Newlines next to block tags are written as expressions: transformers renders templates
# with trim_blocks, which would drop them.)
BENCH_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}<|im_start|>assistant\n{% endif %}"
)

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def pseudo_words(count: int, seed: int) -> list[str]:
    """``count`` distinct lowercase pseudo-words of one to three consonant-vowel syllables."""
    rng = random.Random(seed)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS] + [c + v + "n" for c in _CONSONANTS for v in "ao"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def bench_corpus(seed: int = 0) -> Iterator[str]:
    """posttrain's fixture corpus, then lines of seeded pseudo-words (each word appears several times)."""
    yield from fixtures.training_corpus()
    words = pseudo_words(6000, seed)
    rng = random.Random(seed + 1)
    for _ in range(6):
        order = words[:]
        rng.shuffle(order)
        for start in range(0, len(order), 12):
            yield " ".join(order[start : start + 12]) + "."


def build_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0) -> PreTrainedTokenizerFast:
    """posttrain.fixtures' ChatML tokenizer set-up, trained on :func:`bench_corpus` to ``vocab_size`` entries."""
    backend = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=""))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(fixtures.PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fixtures.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(bench_corpus(seed), trainer=trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        chat_template=BENCH_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"the benchmark tokenizer has {len(tokenizer)} entries, expected {vocab_size}")
    return tokenizer


def single_token_words(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """Words ``w`` (letters only) such that ``" " + w`` encodes to exactly one token, sorted."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([token])
        plain = len(text) >= 3 and text[0] == " " and text[1:].isalpha() and text[1:].isascii()
        if plain and tokenizer(text, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]:
            words.append(text[1:])
    if len(words) < 200:
        raise RuntimeError(f"only {len(words)} single-token words in the benchmark tokenizer")
    return words


def build_model(tokenizer: PreTrainedTokenizerFast, size: str, seed: int = 0, no_eos: bool = False) -> PreTrainedModel:
    """A randomly initialised fp32 Llama of ``size`` (``SIZES``) from ``seed``.

    ``no_eos``: make EOS and PAD practically impossible to sample, so that generation always runs to
    ``max_new_tokens`` in both tools (posttrain has no ``min_new_tokens`` setting; this keeps the generation
    length fixed without giving one tool a logits processor the other lacks). Input embeddings get a constant
    component 1.0 in dimension 0, which dominates the final RMS-normalised hidden state, and the LM-head rows
    of EOS and PAD get -3 in that dimension: their logits sit near -45 while the others stay near 0.
    """
    model = fixtures.build_model(tokenizer, arch="llama", seed=seed, **SIZES[size])
    if no_eos:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 0] = 1.0
            head = model.get_output_embeddings().weight
            for token_id in {tokenizer.eos_token_id, tokenizer.pad_token_id}:
                head[token_id, 0] = -3.0
    return model


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters and N = parameters without the input embedding (the 6N / 2N FLOPs rule)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# ---- data


class TextMaker:
    """Texts of an exact token count from the tokenizer's single-token words, with a seeded RNG."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
        self.tokenizer = tokenizer
        self.words = single_token_words(tokenizer)
        self.rng = random.Random(seed)
        probe = [{"role": "user", "content": self.words_text(5)}]
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        self.prompt_overhead = len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) - 5
        self.completion_overhead = 1  # the completion is its words and <|im_end|> (BENCH_CHAT_TEMPLATE)

    def words_text(self, n: int) -> str:
        """`` w1 w2 ... wn``: n tokens (each word keeps its leading space)."""
        return "".join(" " + self.rng.choice(self.words) for _ in range(n))

    def prompt(self, tokens: int) -> list[dict[str, str]]:
        """A one-turn user conversation whose chat-template rendering (with the generation prompt) is ``tokens``."""
        return [{"role": "user", "content": self.words_text(tokens - self.prompt_overhead)}]

    def completion(self, tokens: int) -> list[dict[str, str]]:
        """An assistant turn of ``tokens`` tokens, EOS included."""
        return [{"role": "assistant", "content": self.words_text(tokens - self.completion_overhead)}]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def build_data(
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    n_pairs: int,
    n_prompts: int,
    prompt_range: tuple[int, int],
    completion_range: tuple[int, int],
    seed: int = 0,
) -> dict[str, Any]:
    """Write the three data sets (conversational rows, read by both tools) and return their paths and lengths.

    * ``prefs.jsonl``: ``n_pairs`` rows ``{prompt, chosen, rejected}``; the prompt renders to a length drawn
      uniformly from ``prompt_range``, each completion (EOS included) from ``completion_range``.
    * ``kto.jsonl``: the unpaired form of the same pairs, ``{prompt, completion, label}`` (chosen: true,
      rejected: false), 2 * n_pairs rows in a seeded shuffled order (so a batch does not hold both halves of
      a pair next to each other, which matters for TRL's in-batch KL pairing).
    * ``prompts.jsonl``: ``n_prompts`` rows ``{prompt}`` for GRPO, prompt lengths as above.
    """
    maker = TextMaker(tokenizer, seed)
    rng = random.Random(seed + 7)
    pairs = []
    for _ in range(n_pairs):
        p, c, r = rng.randint(*prompt_range), rng.randint(*completion_range), rng.randint(*completion_range)
        pairs.append({"prompt": maker.prompt(p), "chosen": maker.completion(c), "rejected": maker.completion(r)})
    unpaired = [{"prompt": row["prompt"], "completion": row["chosen"], "label": True} for row in pairs]
    unpaired += [{"prompt": row["prompt"], "completion": row["rejected"], "label": False} for row in pairs]
    order = list(range(len(unpaired)))
    random.Random(seed + 11).shuffle(order)
    unpaired = [unpaired[i] for i in order]
    prompts = [{"prompt": maker.prompt(rng.randint(*prompt_range))} for _ in range(n_prompts)]
    return {
        "prefs": str(write_jsonl(out_dir / "prefs.jsonl", pairs)),
        "kto": str(write_jsonl(out_dir / "kto.jsonl", unpaired)),
        "prompts": str(write_jsonl(out_dir / "prompts.jsonl", prompts)),
    }


def posttrain_token_ids(
    tokenizer: PreTrainedTokenizerFast, files: dict[str, str], max_length: int, seed: int = 0
) -> dict[str, Any]:
    """The token ids posttrain trains on, by posttrain's own tokenization (the reference for the parity check).

    Returns ``{"prefs": [[prompt, chosen, rejected], ...], "kto": [[prompt, completion, kl_completion], ...],
    "prompts": [prompt, ...]}`` in file order.
    """
    from posttrain.data.formats import load_preference
    from posttrain.data.prompts import load_prompts
    from posttrain.data.tokenize import Renderer, tokenize_preferences
    from posttrain.data.unpaired import load_unpaired, tokenize_unpaired

    renderer = Renderer(tokenizer)
    prompt_limit = max_length // 2
    pairs, stats = tokenize_preferences(load_preference(files["prefs"]), renderer, max_length, prompt_limit)
    if stats.prompt_cut or stats.completion_cut or stats.dropped:
        raise RuntimeError(f"benchmark pairs were truncated: {stats.summary()}")
    unpaired, ustats = tokenize_unpaired(load_unpaired(files["kto"]), renderer, max_length, prompt_limit, seed=seed)
    if ustats.prompt_cut or ustats.completion_cut or ustats.dropped:
        raise RuntimeError(f"benchmark KTO rows were truncated: {ustats.summary()}")
    prompts, pstats = load_prompts(files["prompts"], "train", renderer, prompt_limit)
    if pstats.prompt_cut:
        raise RuntimeError(f"benchmark prompts were truncated: {pstats.summary()}")
    return {
        "prefs": [[list(r.prompt_ids), list(r.chosen_ids), list(r.rejected_ids)] for r in pairs],
        "kto": [[list(r.prompt_ids), list(r.completion_ids), list(r.kl_completion_ids)] for r in unpaired],
        "prompts": [list(r.prompt_ids) for r in prompts],
    }


def check_lengths(ids: dict[str, Any], prompt_range: tuple[int, int], completion_range: tuple[int, int]) -> dict:
    """Min / max of the tokenized lengths, and an error if any falls outside the requested ranges."""
    prompt_lengths = [len(p) for p, _, _ in ids["prefs"]] + [len(p) for p in ids["prompts"]]
    completion_lengths = [len(c) for _, c, r in ids["prefs"] for c in (c, r)]
    out = {
        "prompt_tokens": [min(prompt_lengths), max(prompt_lengths)],
        "completion_tokens": [min(completion_lengths), max(completion_lengths)],
    }
    lo, hi = prompt_range
    if not all(lo <= n <= hi for n in prompt_lengths):
        raise RuntimeError(f"prompt lengths {out['prompt_tokens']} outside {prompt_range}")
    lo, hi = completion_range
    if not all(lo <= n <= hi for n in completion_lengths):
        raise RuntimeError(f"completion lengths {out['completion_tokens']} outside {completion_range}")
    return out
