"""KTO's mismatched partners: a fixed, seeded derangement of the records that avoids a record's own prompt
when it can, the partner completions that tokenized records carry (cut to fit), the KL batches built from
them, and the doctests of the unpaired-data and KTO task modules."""

from __future__ import annotations

import doctest

import pytest
from transformers import PreTrainedTokenizerFast

from posttrain.data import unpaired
from posttrain.data.examples import UnpairedExample, UnpairedRecord
from posttrain.data.formats import DataError
from posttrain.data.tokenize import Renderer
from posttrain.data.unpaired import collate_unpaired, kl_partners, tokenize_unpaired
from posttrain.training import kto as kto_task


def is_derangement(partner: list[int]) -> bool:
    return sorted(partner) == list(range(len(partner))) and all(p != i for i, p in enumerate(partner))


@pytest.mark.parametrize("n", [2, 3, 5, 16, 101])
def test_partners_are_a_fixed_seeded_derangement(n: int) -> None:
    prompts = [f"prompt {i}" for i in range(n)]
    for seed in range(5):
        partner = kl_partners(prompts, seed)
        assert is_derangement(partner), (n, seed, partner)
        assert kl_partners(list(prompts), seed) == partner  # fixed: same prompts and seed, same partners
    if n > 3:
        assert len({tuple(kl_partners(prompts, seed)) for seed in range(5)}) > 1  # the seed matters


def test_partners_avoid_the_same_prompt_when_they_can() -> None:
    """Pairs split into two rows share a prompt: a record is never paired with its twin."""
    prompts = [i // 2 for i in range(40)]  # 20 prompts, 2 records each
    for seed in range(10):
        partner = kl_partners(prompts, seed)
        assert is_derangement(partner)
        assert all(prompts[i] != prompts[p] for i, p in enumerate(partner))
    # Uneven groups, the largest exactly half: still possible, still done.
    prompts = ["a"] * 5 + ["b", "c", "c", "d", "e"]
    partner = kl_partners(prompts, 3)
    assert is_derangement(partner) and all(prompts[i] != prompts[p] for i, p in enumerate(partner))
    # One prompt for every record: impossible to avoid, still a derangement.
    assert is_derangement(kl_partners(["x"] * 4, 0))
    with pytest.raises(ValueError, match="at least 2"):
        kl_partners(["x"], 0)


def test_doctests() -> None:
    for module in (unpaired, kto_task):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_tokenized_records_carry_their_partners_completion_cut_to_fit(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    long_answer = " ".join(["the number is forty-two"] * 12)
    examples = [
        UnpairedExample("What is 2 + 2?", "It is four.", True, 1),
        UnpairedExample("Write a short poem about the sea and the sky. " * 3, "Waves.", False, 2),
        UnpairedExample("Hello!", long_answer, True, 3),
        UnpairedExample("Is this true or false?", "It is true.", False, 4),
    ]
    renderer = Renderer(tiny_tokenizer)
    records, stats = tokenize_unpaired(examples, renderer, max_length=48, max_prompt_length=30, source="s", seed=7)
    assert [r.index for r in records] == [0, 1, 2, 3] and [r.label for r in records] == [True, False, True, False]
    assert stats.rows == 4 and stats.prompt_cut == 1 and stats.completion_cut == 1
    partner = kl_partners([r.prompt_ids for r in records], 7)
    cut = 0
    for r in records:
        own = records[partner[r.index]].completion_ids
        assert r.kl_completion_ids == own[: 48 - len(r.prompt_ids)]  # the truncation policy: keep the start
        assert 0 < len(r.prompt_ids) + len(r.kl_completion_ids) <= 48
        cut += len(r.kl_completion_ids) < len(own)
    assert cut >= 1  # the long answer was cut after a longer prompt than its own


def test_a_single_example_cannot_be_paired(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match=r"^s: KTO needs at least 2 examples .* got 1$"):
        tokenize_unpaired([UnpairedExample("Hi", "Hello", True, 1)], Renderer(tiny_tokenizer), 64, 32, "s")


def test_kl_batches_are_the_mismatched_pairs(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    r = UnpairedRecord((5, 6), (7, 8, 9), True, 0, kl_completion_ids=(10,))
    b = collate_unpaired([r], pad_id=0, kl=True)
    assert b.kl and b.input_ids.tolist() == [[5, 6, 10]] and b.loss_mask.tolist() == [[False, False, True]]
