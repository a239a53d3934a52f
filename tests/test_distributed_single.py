"""The pieces of posttrain.distributed that one process can check alone: shards of a batch, the scripted
sampler's shards, an empty share of a rollout, and the skeleton that fsdp2 saves fill (the launches of two
processes are in tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import CANDIDATES


def test_scripted_shards_draw_what_the_whole_batch_draws(tiny_tokenizer: Any) -> None:
    """Prompt i of a call seeded s draws from seed s + STRIDE * i: two shards called with shard_seed give the
    whole batch's draws, prompt by prompt (the union of two processes' samples is one process's)."""
    from posttrain.rollout.generate import SamplingParams, ScriptedGenerator, shard_seed

    gen = ScriptedGenerator(tiny_tokenizer, CANDIDATES)
    prompts = [tiny_tokenizer(f"Question {i}", add_special_tokens=False)["input_ids"] for i in range(5)]
    params = SamplingParams()
    whole = gen.generate(prompts, 6, params, seed=11)
    first, second = (
        gen.generate(prompts[:2], 6, params, seed=11),
        gen.generate(prompts[2:], 6, params, shard_seed(11, 2)),
    )
    assert first.texts + second.texts == whole.texts
    assert len(set(map(tuple, [whole.texts[i * 6 : i * 6 + 6] for i in range(5)]))) > 1  # prompts differ


def test_shards_cover_the_batch_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain import distributed

    for world in (1, 2, 3, 8):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        parts = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            parts.append(list(range(10))[distributed.shard(10)])
        assert [i for part in parts for i in part] == list(range(10))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_an_empty_share_of_a_rollout_is_on_the_scoring_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process with no rows of a rollout (a DAPO batch short of groups) gathers log-probs on the device the
    others score on (a CPU tensor there would meet CUDA ones in a filler's loss)."""
    from posttrain import distributed
    from posttrain.training.rollouts import Samples, gathered

    ids = torch.zeros((2, 5), dtype=torch.long)
    s = Samples(ids, ids, ids.bool(), torch.zeros(2), {}, torch.zeros(2), torch.zeros(2, dtype=torch.bool))
    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))
    out = gathered([], s)
    assert out.shape == (0, 5) and out.device.type == "meta"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unsharded_fills_an_empty_skeleton(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving under fsdp2 assigns the gathered weights to a skeleton built on the meta device (no second
    copy): the result computes what the model computes, tied embeddings stay tied (qwen2), and the rotary
    buffers come from the model. (The gathering itself is stubbed: one process, the model's own state.)"""
    import torch.distributed.checkpoint.state_dict as dcp_state

    from posttrain import distributed
    from posttrain.fixtures import build_model, build_tokenizer
    from posttrain.model.load import empty_weights, load_causal_lm

    tokenizer = build_tokenizer("chatml")
    build_model(tokenizer, arch=arch).save_pretrained(tmp_path / arch)
    model = load_causal_lm(str(tmp_path / arch))
    with empty_weights():
        skeleton = load_causal_lm(str(tmp_path / arch))
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    monkeypatch.setattr(distributed, "is_sharded", lambda m: True)
    monkeypatch.setattr(dcp_state, "get_model_state_dict", lambda m, options: m.state_dict())
    plain = distributed.unsharded(model, lambda: load_causal_lm(str(tmp_path / arch)))
    assert plain is not None and plain is not model
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    if arch == "qwen2":
        assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    ids = torch.randint(10, 500, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
