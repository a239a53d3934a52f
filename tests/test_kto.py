"""KTO end to end: unpaired data and its checks, the KL baseline over the global batch, the references, the
imbalance guidance, and a tiny model that learns (the fixed mismatched partners: test_kto_partners.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import BIT_EXACT, assert_close_for_device, assert_plain_transformers_loads, run_config
from torch import nn
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.config import ConfigError, load
from posttrain.data.examples import UnpairedExample, UnpairedRecord
from posttrain.data.formats import DataError
from posttrain.data.unpaired import load_unpaired
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.model.logps import completion_logps
from posttrain.training import kto as kto_task
from posttrain.training.kto import UnpairedTask, class_means
from posttrain.training.metrics import MetricSums, read_metrics
from posttrain.training.reference import FrozenReference

BUNDLED = Path(posttrain.__file__).parent / "bundled" / "prefs_train.jsonl"
UNHELPFUL = ["I do not know.", "No idea, sorry.", "Ask someone else.", "Maybe later."]


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 unpaired rows over the first 32 bundled prompts: even rows the correct answer (desirable), odd rows
    an unhelpful reply (undesirable). Balanced 16:16, so no imbalance advice is printed."""
    rows = []
    for i, line in enumerate(BUNDLED.read_text().splitlines()[:32]):
        pair = json.loads(line)
        good = i % 2 == 0
        completion = pair["chosen"] if good else UNHELPFUL[(i // 2) % len(UNHELPFUL)]
        rows.append({"prompt": pair["prompt"], "completion": completion, "label": good})
    path = tmp_path_factory.mktemp("data") / "unpaired.jsonl"
    write_jsonl(path, rows)
    return path


def kto_config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return run_config("kto", model, data, out, **extra)


# ------------------------------------------------------------------------------------------------------
# Data: rows, pairs split into two, one-line errors


def test_unpaired_rows_strings_conversations_and_text_labels(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Hi?"}
    reply = {"role": "assistant", "content": "Hello."}
    rows = [
        {"prompt": "2 + 2?", "completion": "4", "label": True, "extra": "ignored"},
        {"prompt": [user], "completion": [reply], "label": False},
        {"prompt": "Hi?", "completion": [reply], "label": " TRUE "},  # a string prompt becomes a user turn
    ]
    examples = load_unpaired(write_jsonl(tmp_path / "u.jsonl", rows))
    assert examples == [
        UnpairedExample("2 + 2?", "4", True, 1),
        UnpairedExample([user], [reply], False, 2),
        UnpairedExample([user], [reply], True, 3),
    ]
    csv = tmp_path / "u.csv"
    csv.write_text("prompt,completion,label\n2 + 2?,4,true\n3 + 3?,7,False\n", encoding="utf-8")
    assert [e.label for e in load_unpaired(str(csv))] == [True, False]


def test_preference_rows_are_split_into_two_unpaired_rows(tmp_path: Path) -> None:
    """Chosen -> True, then rejected -> False, same prompt and row; an implicit prompt is split as for DPO."""
    rows = [
        {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "1 + 1?", "completion": "2", "label": True},  # the two shapes may be mixed
    ]
    examples = load_unpaired(write_jsonl(tmp_path / "p.jsonl", rows))
    assert examples == [
        UnpairedExample("2 + 2?", "4", True, 1),
        UnpairedExample("2 + 2?", "5", False, 1),
        UnpairedExample("The sky is", " blue.", True, 2),
        UnpairedExample("The sky is", " green.", False, 2),
        UnpairedExample("1 + 1?", "2", True, 3),
    ]
    # The bundled pairs: twice as many examples, half of them desirable.
    bundled = load_unpaired(str(BUNDLED))
    assert len(bundled) == 2 * len(BUNDLED.read_text().splitlines()) and sum(e.label for e in bundled) * 2 == len(
        bundled
    )


USER = [{"role": "user", "content": "Hi?"}]
BAD_ROWS = [
    ({"prompt": "p", "completion": "c", "label": 1}, "field 'label': expected true or false, got 1"),
    ({"prompt": "p", "completion": "c", "label": "yes"}, "field 'label': expected true or false, got 'yes'"),
    ({"prompt": "p", "completion": "c"}, "field 'label': missing (true for a desirable completion, false for an"),
    ({"prompt": "p", "label": True}, "field 'completion': missing"),
    ({"completion": "c", "label": True}, "field 'prompt': missing"),
    ({"prompt": "p", "completion": " ", "label": True}, "field 'completion': empty"),
    (
        {"prompt": USER, "completion": "c", "label": True},
        "field 'completion': must be a list of messages when 'prompt' is a conversation",
    ),
    (
        {"prompt": "p", "completion": USER, "label": True},
        "field 'completion': the conversation must end with the assistant, ends with 'user'",
    ),
    (
        {
            "prompt": [{"role": "assistant", "content": "x"}],
            "completion": [{"role": "assistant", "content": "y"}],
            "label": False,
        },
        "field 'prompt': must not end with the assistant",
    ),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "field 'rejected': identical to 'chosen'"),
    ("just text", "expected an object with named fields, got str"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_rows_give_one_line_naming_file_row_and_field(row: Any, message: str, tmp_path: Path) -> None:
    good = {"prompt": "q", "completion": "a", "label": True}
    source = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as info:
        load_unpaired(source)
    text = str(info.value)
    assert text.startswith(f"{source}: row 2: ") and message in text and "\n" not in text


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: no rows$"):
        load_unpaired(str(tmp_path / "e.jsonl"))


# ------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_checks(tiny_model_dir: Path, unpaired_file: Path) -> None:
    config = load(kto_config(tiny_model_dir, unpaired_file, Path("out"), learning_rate=None))
    a = config.algorithm
    assert (a.name, a.data_kind, a.needs_reference) == ("kto", "unpaired", True)  # type: ignore[attr-defined]
    assert (a.beta, a.desirable_weight, a.undesirable_weight) == (0.1, 1.0, 1.0)  # type: ignore[attr-defined]
    assert config.lr == 1e-6
    cases = [
        ({"reference": "none"}, "reference.kind: method 'kto' needs a reference: copy or cached, got none"),
        ({"beta": 0}, "beta: must be > 0, got 0.0"),
        ({"desirable_weight": -1}, "desirable_weight: must be > 0, got -1.0"),
        ({"undesirable_weight": 0}, "undesirable_weight: must be > 0, got 0.0"),
        ({"gamma": 1.0}, "gamma: not a parameter of method 'kto' (used by simpo, ppo)"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as info:
            load(kto_config(tiny_model_dir, unpaired_file, Path("out"), **extra))
        assert str(info.value) == message


# ------------------------------------------------------------------------------------------------------
# The KL baseline over the global batch


def perturbed(model: nn.Module, scale: float, seed: int) -> nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


@pytest.fixture(scope="module")
def double_models(tiny_model_dir: Path) -> tuple[nn.Module, nn.Module]:
    """(policy, reference) in float64: the reference the starting weights, the policy moved away from it."""
    reference = load_causal_lm(str(tiny_model_dir), trainable=False).double()
    return perturbed(reference, 0.05, seed=1).train(), reference


def make_task(model_dir: Path, data: Path, micro: int, reference: nn.Module) -> UnpairedTask:
    config = load(kto_config(model_dir, data, Path("unused"), micro_batch_size=micro))
    task = UnpairedTask(config, load_tokenizer(config.model), torch.device("cpu"))
    task.references = {"train": FrozenReference(reference, task.score)}
    return task


def hand_z0(policy: nn.Module, reference: nn.Module, records: list[UnpairedRecord]) -> float:
    """One unpadded forward per mismatched pair: mean of the policy-minus-reference log-ratios."""
    ratios = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r.prompt_ids + r.kl_completion_ids])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(r.prompt_ids) :] = True
            ones = torch.ones_like(ids)
            p = completion_logps(policy, ids, ones, mask).sums
            q = completion_logps(reference, ids, ones, mask).sums
            ratios.append(float(p - q))
    return sum(ratios) / len(ratios)


def test_z0_is_the_clamped_mean_of_mismatched_log_ratios_whatever_the_micro_batches(
    tiny_model_dir: Path, unpaired_file: Path, double_models: tuple[nn.Module, nn.Module]
) -> None:
    policy, reference = double_models
    whole = make_task(tiny_model_dir, unpaired_file, 8, reference)
    split = make_task(tiny_model_dir, unpaired_file, 2, reference)
    records, _ = whole.load_records(str(unpaired_file), "train")
    batch = records[:8]
    z_whole, z_split = whole.step_context(policy, batch, "train"), split.step_context(policy, batch, "train")
    assert z_whole.dtype == torch.float64 and z_whole.dim() == 0 and not z_whole.requires_grad
    expected = hand_z0(policy, reference, batch)
    assert expected != 0.0
    # Padding changes float64 sums in the last bits only (values of a few nats): 1e-12 relative is tight.
    torch.testing.assert_close(z_whole, z_split, rtol=1e-12, atol=0)
    torch.testing.assert_close(z_whole, torch.tensor(max(0.0, expected), dtype=torch.float64), rtol=1e-12, atol=0)
    # Swapping the roles negates every log-ratio: one of the two means is negative and clamps to exactly 0.
    swapped = make_task(tiny_model_dir, unpaired_file, 4, policy).step_context(reference, batch, "train")
    torch.testing.assert_close(swapped, torch.tensor(max(0.0, -expected), dtype=torch.float64), rtol=1e-12, atol=0)
    assert 0.0 in (float(z_whole), float(swapped))


def test_z0_agrees_across_data_parallel_shards(
    tiny_model_dir: Path,
    unpaired_file: Path,
    double_models: tuple[nn.Module, nn.Module],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two ranks, each given the global batch, score their half and sum their totals: each gets the z0 of
    the whole batch (the ranks simulated in this process)."""
    policy, reference = double_models
    task = make_task(tiny_model_dir, unpaired_file, 2, reference)
    records, _ = task.load_records(str(unpaired_file), "train")
    full = task.step_context(policy, records[:8], "train")
    monkeypatch.setattr(kto_task.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(kto_task.distributed, "rank", lambda: 0)
    alone = task.step_context(policy, records[:8], "train")  # rank 0's half, nothing added
    assert full > 0 and abs(float(alone - full)) > 0.01  # a shard alone would get another baseline
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(kto_task.distributed, "all_reduce_sum", lambda t: seen.append(t.clone()) or t)
    monkeypatch.setattr(kto_task.distributed, "rank", lambda: 1)
    task.step_context(policy, records[:8], "train")  # rank 1: record its totals
    monkeypatch.setattr(kto_task.distributed, "all_reduce_sum", lambda t: t.add_(seen[0]))
    monkeypatch.setattr(kto_task.distributed, "rank", lambda: 0)
    rank0 = task.step_context(policy, records[:8], "train")
    torch.testing.assert_close(rank0, full, rtol=1e-12, atol=0)


def test_accumulation_1x8_equals_4x2(
    tiny_model_dir: Path, unpaired_file: Path, double_models: tuple[nn.Module, nn.Module]
) -> None:
    """Micro-batches of 2 give the gradient of one batch of 8: global count and one z0 for the step."""
    _, reference = double_models
    grads = []
    for micro in (8, 2):
        policy = perturbed(reference, 0.05, seed=1).train()
        for p in policy.parameters():
            p.requires_grad_(True)
        task = make_task(tiny_model_dir, unpaired_file, micro, reference)
        records, _ = task.load_records(str(unpaired_file), "train")
        step = records[:8]
        counts, context, sums = task.counts(step), task.step_context(policy, step, "train"), MetricSums()
        assert context > 0.1  # z0 takes part: the perturbed policy sits above the reference here
        for start in range(0, 8, micro):
            task.loss(policy, task.collate(step[start : start + micro]), "train", counts, sums, context).backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12, msg=name)


def test_class_means_of_a_one_class_batch_have_no_nan(
    tiny_model_dir: Path, unpaired_file: Path, double_models: tuple[nn.Module, nn.Module]
) -> None:
    policy, reference = double_models
    task = make_task(tiny_model_dir, unpaired_file, 4, reference)
    records, _ = task.load_records(str(unpaired_file), "train")
    desirable = [r for r in records if r.label][:4]
    sums = MetricSums()
    with torch.no_grad():
        context = task.step_context(policy, desirable, "train")
        task.loss(policy, task.collate(desirable), "train", task.counts(desirable), sums, context)
    figures = task.finish_figures(sums.mean(task.counts(desirable)))
    assert figures["desirable"] == 1.0 and figures["undesirable"] == 0.0
    assert not any(k.startswith("undesirable_") for k in figures)
    assert all(v == v for v in figures.values())  # no NaN
    assert figures["desirable_rewards"] == pytest.approx(figures["rewards"], rel=1e-12)
    assert class_means({"desirable": 0.0, "desirable_rewards": 0.0}) == {"desirable": 0.0}


# ------------------------------------------------------------------------------------------------------
# The imbalance guidance


@pytest.mark.parametrize(
    ("n_desirable", "n_undesirable", "extra", "advice"),
    [
        (6, 2, {}, "= 1 * 6 / (1 * 2) = 3.00 is outside [1, 4/3]"),
        (6, 2, {"undesirable_weight": 2.25}, None),  # 6 / (2.25 * 2) = 1.33
        (4, 4, {}, None),
        (2, 6, {}, "for this data set desirable_weight: 3 and undesirable_weight: 1"),
        (8, 0, {}, "the training data has no undesirable examples"),
    ],
)
def test_imbalance_guidance_is_printed_at_load(
    n_desirable: int,
    n_undesirable: int,
    extra: dict[str, Any],
    advice: str | None,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    labels = [True] * n_desirable + [False] * n_undesirable
    rows = [
        {"prompt": f"What is {i} + 1?", "completion": f"It is {i + 1}.", "label": lab} for i, lab in enumerate(labels)
    ]
    data = Path(write_jsonl(tmp_path / "d.jsonl", rows))
    config = load(kto_config(tiny_model_dir, data, tmp_path / "out", **extra))
    task = UnpairedTask(config, load_tokenizer(config.model), torch.device("cpu"))
    task.load_records(str(data), "train")
    task.load_records(str(data), "train")  # the eval file may be the training file: advice printed once
    out = capsys.readouterr().out
    if advice is None:
        assert "kto:" not in out
    else:
        assert advice in out and out.count("kto:") == 1


# ------------------------------------------------------------------------------------------------------
# End to end on the tiny model


def test_kto_trains_and_the_saved_model_loads_with_plain_transformers(
    tiny_model_dir: Path, unpaired_file: Path, tmp_path: Path
) -> None:
    """The paper's defaults (beta 0.1, λ_D = λ_U = 1): the held-out loss falls, desirable completions gain
    reward over the reference and undesirable ones lose it; plain transformers loads the model."""
    result = posttrain.train(kto_config(tiny_model_dir, unpaired_file, tmp_path / "run"))
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert before["loss"] == pytest.approx(0.5, abs=1e-6)  # r = z0 = 0 at the start: 1 - σ(0)
    assert before["desirable_rewards"] == 0.0 and before["undesirable_rewards"] == 0.0 and before["kl"] == 0.0
    assert after["loss"] < before["loss"] - 0.2, (before["loss"], after["loss"])
    assert after["desirable_rewards"] > 0.5, after
    assert after["undesirable_rewards"] < -0.5, after
    assert after["desirable_policy_logps"] > before["desirable_policy_logps"]
    assert after["undesirable_policy_logps"] < before["undesirable_policy_logps"]
    losses = [m["loss"] for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.1
    assert all(m["kl"] >= 0.0 for m in read_metrics(result.metrics_path))

    assert_plain_transformers_loads(result.model_dir)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tokenizer = load_tokenizer(str(result.model_dir))
    # The saved weights are the trained ones: they reproduce the final held-out policy log-probs.
    config = load(result.output_dir / "config.yaml")
    task = UnpairedTask(config, tokenizer, torch.device("cpu"))
    records, _ = task.load_records(str(unpaired_file), "train")
    with torch.no_grad():
        logps = torch.cat([task.score(model, task.collate(records[s : s + 8])) for s in range(0, len(records), 8)])
    assert float(logps.mean()) == pytest.approx(after["policy_logps"], rel=1e-5)


def test_micro_batching_leaves_the_step_unchanged(tiny_model_dir: Path, unpaired_file: Path, tmp_path: Path) -> None:
    """Through the loop, two steps: loss, z0, rewards and grad norm are the same with 1x8 and 4x2 micro-batches
    (z0 itself against micro-batching: test_z0_is_the_clamped_mean_...)."""
    runs = []
    for mb in (8, 2):
        cfg = kto_config(tiny_model_dir, unpaired_file, tmp_path / f"mb{mb}", micro_batch_size=mb, max_steps=2)
        cfg["data"] = {**cfg["data"], "eval": None}
        runs.append([m for m in read_metrics(posttrain.train(cfg).metrics_path) if m["split"] == "train"])
    # fp32 log-probs of ~100 nats differ by ~1e-5 nats with padding; rewards are 0.1 x differences of them.
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "kl", "desirable_rewards", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=2e-6), key


def test_cached_reference_matches_copy_and_is_reused(
    tiny_model_dir: Path, unpaired_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache (own and mismatched completions) gives a frozen copy's figures; a rerun reuses the file."""
    cache = tmp_path / "cache"
    cached = {"reference": {"kind": "cached", "cache_dir": str(cache)}, "max_steps": 3, **BIT_EXACT}
    copy_run = posttrain.train(kto_config(tiny_model_dir, unpaired_file, tmp_path / "copy", max_steps=3, **BIT_EXACT))
    first = posttrain.train(kto_config(tiny_model_dir, unpaired_file, tmp_path / "c1", **cached))
    assert "computed and cached" in capsys.readouterr().out
    assert len(list(cache.glob("*.safetensors"))) == 1  # train and eval are the same records: one key
    second = posttrain.train(kto_config(tiny_model_dir, unpaired_file, tmp_path / "c2", **cached))
    assert "reused cache" in capsys.readouterr().out
    train = lambda r: [m for m in read_metrics(r.metrics_path) if m["split"] == "train"]  # noqa: E731
    a, b, c = train(copy_run), train(first), train(second)
    assert [m["loss"] for m in b] == [m["loss"] for m in c]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kl", "ref_logps"):
            assert_close_for_device(y[key], x[key], rel=1e-5, abs=1e-6, msg=key)


def test_lora_reference_is_the_base_with_adapters_off(
    tiny_model_dir: Path, unpaired_file: Path, tmp_path: Path
) -> None:
    """With LoRA the reference is the policy with its adapters disabled: scored each step (copy) or cached,
    the run is the same, and it starts exactly at the reference (loss 1 - σ(0), z0 = 0)."""
    pytest.importorskip("peft")
    runs = []
    for kind in ("copy", "cached"):
        extra = {"lora": {"r": 4}, "max_steps": 3, "reference": {"kind": kind, "cache_dir": str(tmp_path / "c")},
                 **BIT_EXACT}  # fmt: skip
        runs.append(posttrain.train(kto_config(tiny_model_dir, unpaired_file, tmp_path / kind, **extra)))
    for run in runs:
        assert_close_for_device(run.summary["heldout_before"]["loss"], 0.5, abs=1e-6, msg="loss")
        assert_close_for_device(run.summary["heldout_before"]["kl"], 0.0, msg="kl")
    a, b = ([m for m in read_metrics(r.metrics_path) if m["split"] == "train"] for r in runs)
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kl", "ref_logps"):
            assert_close_for_device(y[key], x[key], rel=1e-5, abs=1e-6, msg=key)
