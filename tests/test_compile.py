"""``compile``: the decoder layers through torch.compile, attention outside the graph (posttrain/model/compiled.py).

The recompilation count is the contract: lengths that change every batch must not recompile every batch
(torch gives up after its recompile limit and runs eager without a word). The tests compile with the
``eager`` backend: dynamo still traces, guards and recompiles exactly as with inductor, in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from support import first_bundled_pairs, run_config
from transformers import PreTrainedTokenizerFast

import posttrain
from posttrain.config import ConfigError, load
from posttrain.data.collate import collate_pairs
from posttrain.data.examples import PreferenceRecord
from posttrain.fixtures import build_model
from posttrain.model import compiled
from posttrain.model.logps import completion_logps


@pytest.fixture
def eager_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    dynamo.reset()
    dynamo.utils.counters.clear()


def records(length: int, g: torch.Generator) -> list[PreferenceRecord]:
    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(6, 100, (n,), generator=g).tolist())

    return [PreferenceRecord(ids(length), ids(length + i), ids(length + 2 * i + 1), i) for i in range(3)]


@pytest.mark.parametrize("layout", ["padded", "shared_prefix"])
def test_varied_lengths_stop_recompiling(
    eager_backend: None, tiny_tokenizer: PreTrainedTokenizerFast, layout: str
) -> None:
    """Three lengths compile what a run needs (static, then dynamic lengths; the shared-prefix layout's
    graph breaks around span attention add the pieces on each side of it); ten more lengths add nothing."""
    model = build_model(tiny_tokenizer, arch="llama")
    compiled.compile_layers(model)
    g = torch.Generator().manual_seed(0)

    def train_on(length: int) -> None:
        b = collate_pairs(records(length, g), 0, layout)
        out = completion_logps(model, b.input_ids, b.attention_mask, b.loss_mask, position_ids=b.position_ids,
                               spans=b.spans)  # fmt: skip
        out.logps.sum().backward()

    for length in (3, 5, 8):
        train_on(length)
    warm = dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= warm <= 12
    for length in (11, 13, 17, 20, 23, 26, 29, 31, 37, 41):
        train_on(length)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == warm


def test_a_compiled_run_equals_an_eager_one(eager_backend: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = first_bundled_pairs(tmp_path / "pairs.jsonl", 16)
    figures = {}
    for setting in (False, True):
        out = tmp_path / str(setting)
        config = run_config("dpo", tiny_model_dir, pairs, out, max_steps=3, compile=setting)
        config["data"].pop("eval")
        posttrain.train(config)
        figures[setting] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers did go through dynamo
    assert figures[True] == figures[False]


def test_compile_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert not compiled.wanted("auto", torch.device("cpu"))  # measured not to pay on a CPU
    assert compiled.wanted(True, torch.device("cpu")) and not compiled.wanted(False, torch.device("cuda"))
    base = {"model": str(tiny_model_dir), "output_dir": str(tmp_path / "o"), "data": {"train": "x.jsonl"}}
    with pytest.raises(ConfigError, match=r"^compile: true is for the offline methods; grpo samples"):
        load({**base, "method": "grpo", "compile": True})
    with pytest.raises(ConfigError, match=r"^compile: must be one of auto, True, False; got 'yes'"):
        load({**base, "method": "dpo", "compile": "yes"})
    assert load({**base, "method": "grpo"}).compile == "auto"
