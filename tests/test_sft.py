"""SFT: the loss mask covers the assistant's tokens only, the token-level mean uses global counts, and a
tiny model learns the demonstrations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import run_config
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.config import load
from posttrain.data.sft import SFTExample, load_sft, tokenize_sft
from posttrain.data.tokenize import Renderer
from posttrain.fixtures import build_tokenizer
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.training.metrics import MetricSums, read_metrics
from posttrain.training.sft import SFTTask

BUNDLED = Path(posttrain.__file__).parent / "bundled" / "prefs_train.jsonl"


def test_prompt_completion_mask_is_the_completion() -> None:
    tok = build_tokenizer("chatml")
    renderer = Renderer(tok)
    ex = SFTExample(prompt="What is 2 + 3?", completion="It is 5.", row=1)
    (rec,), _ = tokenize_sft([ex], renderer, 256, completion_only=True)
    trained = [t for t, m in zip(rec.input_ids, rec.loss_mask, strict=True) if m]
    assert tok.decode(trained) == "It is 5.<|im_end|>\n"
    assert tok.decode(rec.input_ids) == tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}], tokenize=False
    )
    (everything,), _ = tokenize_sft([ex], renderer, 256, completion_only=False)
    assert everything.loss_mask == (False,) + (True,) * (len(everything.input_ids) - 1)


def test_multi_turn_trains_every_assistant_turn_and_nothing_else() -> None:
    tok = build_tokenizer("chatml")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2."},
    ]
    (rec,), _ = tokenize_sft([SFTExample(None, messages, 1)], Renderer(tok), 256, completion_only=True)
    assert tok.decode(rec.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    runs, current = [], []
    for t, m in zip(rec.input_ids, rec.loss_mask, strict=True):
        if m:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    runs += [tok.decode(current)] if current else []
    assert runs == ["Hello!<|im_end|>\n", "2.<|im_end|>\n"]


def test_rows_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows: list[dict[str, Any]] = [
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_sft(str(path))
    assert [e.completion for e in examples[:2]] == ["c", "c"]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "u"}]}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl: row 1: field 'messages': has no assistant turn"):
        load_sft(str(path))


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    path.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:32]))
    return path


def sft_config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return run_config("sft", model, data, out, **extra)


def test_sft_trains_and_saves(tiny_model_dir: Path, sft_file: Path, tmp_path: Path) -> None:
    result = posttrain.train(sft_config(tiny_model_dir, sft_file, tmp_path / "run"))
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert after["loss"] < before["loss"] - 0.5, (before["loss"], after["loss"])
    train = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    AutoModelForCausalLM.from_pretrained(result.model_dir)  # loads with plain transformers


def _grads(micro: int, tiny_model_dir: Path, sft_file: Path) -> dict[str, torch.Tensor]:
    config = load(sft_config(tiny_model_dir, sft_file, Path("unused"), micro_batch_size=micro))
    task = SFTTask(config, load_tokenizer(config.model), torch.device("cpu"))
    records, _ = task.load_records(str(sft_file), "train")
    model = load_causal_lm(config.model).double()
    counts = task.counts(records[:8])
    for start in range(0, 8, micro):
        task.loss(model, task.collate(records[start : start + micro]), "train", counts, MetricSums(), None).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_token_mean_with_global_counts_1x8_equals_8x1(tiny_model_dir: Path, sft_file: Path) -> None:
    """Rows have different completion lengths: only a global token count makes the split invisible."""
    whole, split = _grads(8, tiny_model_dir, sft_file), _grads(1, tiny_model_dir, sft_file)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-9, atol=1e-12, msg=name)


def test_sft_loss_by_hand() -> None:
    """logps [[0, -1, -2], [0, -3, 0]] on masks [[F, T, T], [F, T, F]]: losses 1, 2 and 3 on three tokens;
    the global token mean is (1 + 2 + 3) / 3 = 2."""
    from posttrain.losses import aggregate, sft

    logps = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, 0.0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    out = sft(policy_logps=logps, loss_mask=mask)
    assert out.loss.tolist() == [[0.0, 1.0, 2.0], [0.0, 3.0, 0.0]]
    assert out.metrics["tokens"].tolist() == [2.0, 1.0]
    assert float(aggregate(out.loss, global_count=int(mask.sum()))) == 2.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_packing_scores_each_example_as_alone(arch: str) -> None:
    """Packed rows (positions restarting per example, no attention mask) give the padded batch's per-token
    log-probs and gradients: no attention leaks between packed examples."""
    from posttrain.data.sft import SequenceRecord, collate_packed, collate_sequences
    from posttrain.fixtures import build_model
    from posttrain.model.logps import completion_logps

    tok = build_tokenizer("chatml")
    model = build_model(tok, arch=arch, seed=1).double()
    g = torch.Generator().manual_seed(0)
    records = []
    for i, n in enumerate((7, 4, 9, 3, 6)):
        ids = tuple(torch.randint(6, len(tok), (n,), generator=g).tolist())
        records.append(SequenceRecord(ids, (False,) + (True,) * (n - 1), i))

    def scores(batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        out = completion_logps(
            model, batch.input_ids, batch.attention_mask, batch.loss_mask, position_ids=batch.position_ids,
            spans=batch.spans,
        )  # fmt: skip
        flat = out.logps[out.mask]  # completion tokens in record order, whatever the layout
        flat.sum().backward()  # the total log-likelihood: its gradient does not depend on the layout
        return flat.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded = collate_sequences(records, pad_id=tok.pad_token_id)
    packed = collate_packed(records, pad_id=tok.pad_token_id, max_length=16)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # several examples share a row
    order = packed.index.tolist()
    flat_padded, grads_padded = scores(padded)
    flat_packed, grads_packed = scores(packed)
    # Re-order the padded scores into the packed layout's record order before comparing.
    per_record = torch.split(flat_padded, [len(r.input_ids) - 1 for r in records])
    expected = torch.cat([per_record[i] for i in order])
    torch.testing.assert_close(flat_packed, expected, rtol=1e-10, atol=1e-10)
    assert order != sorted(order)  # first-fit moved a later example into an earlier row
    # Gemma's RMSNorm computes in float32 even in a float64 model: its gradients agree to float32 precision.
    rtol, atol = (1e-5, 1e-7) if arch == "gemma2" else (1e-8, 1e-10)
    for name in grads_padded:
        torch.testing.assert_close(
            grads_packed[name], grads_padded[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
    if arch == "gemma2":  # soft-capped attention: span attention does not apply (layout auto stays padded)
        return
    # The same rows scored with span attention (layout: packed): one causal block per record.
    flat_spans, grads_spans = scores(collate_packed(records, pad_id=tok.pad_token_id, max_length=16, spans=True))
    torch.testing.assert_close(flat_spans, expected, rtol=1e-10, atol=1e-10)
    for name in grads_padded:
        torch.testing.assert_close(grads_spans[name], grads_padded[name], rtol=1e-8, atol=1e-10, msg=name)


def test_packed_sft_run_matches_padded(tiny_model_dir: Path, sft_file: Path, tmp_path: Path) -> None:
    """The whole loop with packing gives the same step losses as without (same tokens, same global count)."""
    runs = []
    for packing, layout in ((False, "auto"), (True, "padded"), (True, "auto")):
        out = tmp_path / f"p{packing}-{layout}"
        cfg = sft_config(tiny_model_dir, sft_file, out, max_steps=3, packing=packing, layout=layout)
        runs.append([m["loss"] for m in read_metrics(posttrain.train(cfg).metrics_path) if m["split"] == "train"])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["layout"] == ("packed" if packing and layout == "auto" else "padded")
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)  # transformers' block-diagonal mask
    assert runs[2] == pytest.approx(runs[0], rel=1e-5)  # span attention


def test_sft_reads_implicit_prompt_preference_rows(tmp_path: Path) -> None:
    """A pair with no prompt column (shared prefix) trains on the prompt/chosen split DPO would use."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}) + "\n")
    (ex,) = load_sft(str(path))
    assert (ex.prompt, ex.completion) == ("Q: 2+2? A:", " 4")
