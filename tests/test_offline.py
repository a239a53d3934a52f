"""End to end on a tiny model: every DPO-family method trains, accumulation and resume keep the maths,
the reference cache is reused, and the saved model is the trained one, loadable by plain transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support import (
    BIT_EXACT,
    assert_close_for_device,
    assert_plain_transformers_loads,
    first_bundled_pairs,
    killed_after_first_checkpoint,
    run_config,
)
from transformers import AutoModelForCausalLM

import posttrain
from posttrain.algorithms import ALGORITHMS, PreferenceAlgorithm
from posttrain.config import load
from posttrain.model.load import load_causal_lm, load_tokenizer
from posttrain.training import checkpoint
from posttrain.training.metrics import MetricSums, read_metrics
from posttrain.training.pairs import PairTask
from posttrain.training.reference import FrozenReference


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_bundled_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def tiny_config(model: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return run_config(extra.pop("method", "dpo"), model, data, out, **extra)


def train_losses(metrics_path: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(metrics_path) if m["split"] == "train"]


@pytest.mark.parametrize("method", sorted(n for n, c in ALGORITHMS.items() if issubclass(c, PreferenceAlgorithm)))
def test_each_method_trains(method: str, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """The loss falls and the method's reward accuracy on the pairs rises from where it started."""
    extra: dict[str, Any] = {"method": method}
    if method in ("ipo", "hinge"):
        extra["beta"] = 0.5  # IPO's target margin 1/(2 beta) and the hinge's 1/beta within a few steps' reach
    if method == "orpo":
        extra["orpo_lambda"] = 1.0  # at the paper's 0.1 the NLL term dominates a 12-step run
    if method == "distill":  # its data need a reward margin per pair: 1, a target h of 1 / beta = 2 nats
        rows = [{**json.loads(line), "margin": 1.0} for line in pairs_file.read_text().splitlines()]
        pairs_file = tmp_path / "margins.jsonl"
        pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        extra["beta"] = 0.5
    result = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / method, **extra))
    losses = train_losses(result.metrics_path)
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert after["loss"] < before["loss"] - 0.05, (before["loss"], after["loss"])
    assert sum(losses[-3:]) / 3 < losses[0]
    assert after["accuracy"] > before["accuracy"] + 0.2, (before["accuracy"], after["accuracy"])
    assert after["margins"] > before["margins"]


def _grads_after(micro_batch_size: int, tiny_model_dir: Path, pairs_file: Path) -> dict[str, torch.Tensor]:
    config = load(tiny_config(tiny_model_dir, pairs_file, Path("unused"), micro_batch_size=micro_batch_size))
    task = PairTask(config, load_tokenizer(config.model), torch.device("cpu"))
    records, _ = task.load_records(str(pairs_file), "train")
    policy = load_causal_lm(config.model).double()
    reference = load_causal_lm(config.model, trainable=False).double()
    task.references = {"train": FrozenReference(reference, task.score)}
    counts = task.counts(records[:8])
    for start in range(0, 8, micro_batch_size):
        batch = task.collate(records[start : start + micro_batch_size])
        task.loss(policy, batch, "train", counts, MetricSums(), None).backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def test_accumulation_1x8_equals_8x1(tiny_model_dir: Path, pairs_file: Path) -> None:
    """Eight micro-batches of one pair give the gradient of one batch of eight (global pair count)."""
    whole = _grads_after(8, tiny_model_dir, pairs_file)
    split = _grads_after(1, tiny_model_dir, pairs_file)
    assert whole.keys() == split.keys() and whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-9, atol=1e-12, msg=name)


def test_accumulation_run_figures_match(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Through the whole loop: step-1 loss and metrics are the same with 1x8 and 4x2 micro-batches."""
    runs = []
    for mb in (8, 2):
        cfg = tiny_config(
            tiny_model_dir, pairs_file, tmp_path / f"mb{mb}", micro_batch_size=mb, max_steps=1, **BIT_EXACT
        )
        runs.append(read_metrics(posttrain.train(cfg).metrics_path))
    first = [next(m for m in r if m["split"] == "train") for r in runs]
    # (Step 1: policy = reference, every margin a tie at 0, which BIT_EXACT keeps a tie on CUDA too.)
    for key in ("loss", "accuracy", "margins", "policy_chosen_logps", "grad_norm"):
        assert_close_for_device(first[0][key], first[1][key], rel=1e-5, abs=1e-7, msg=key)


def test_saved_model_is_the_trained_one(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Plain transformers loads model/ (no posttrain import) and scores the eval pairs as training ended."""
    result = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=4))
    assert_plain_transformers_loads(result.model_dir)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tokenizer = load_tokenizer(str(result.model_dir))
    # The saved weights reproduce the final evaluation exactly (they are the trained weights, not a copy).
    config = load(result.output_dir / "config.yaml")
    task = PairTask(config, tokenizer, torch.device("cpu"))
    records, _ = task.load_records(str(pairs_file), "train")
    chosen = []
    with torch.no_grad():
        for start in range(0, len(records), 8):
            chosen.append(task.score(model, task.collate(records[start : start + 8])).chosen_logps)
    mean_chosen = float(torch.cat(chosen).mean())
    assert mean_chosen == pytest.approx(result.summary["heldout_after"]["policy_chosen_logps"], rel=1e-5)
    assert not (result.model_dir.parent / "checkpoints").exists()  # no save_steps: no resumable state kept


def test_resume_equals_uninterrupted(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill a run right after its step-3 checkpoint, resume it: weights and metrics equal a straight run."""
    extra = {"max_steps": 6, "save_steps": 3, "lr_scheduler": "cosine", "warmup_ratio": 0.2, **BIT_EXACT}
    straight = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "straight", **extra))

    cfg = tiny_config(tiny_model_dir, pairs_file, tmp_path / "resumed", **extra)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    assert checkpoint.latest_checkpoint(tmp_path / "resumed") == tmp_path / "resumed" / "checkpoints" / "step-000003"
    resumed = posttrain.train(cfg, resume=True)

    a = AutoModelForCausalLM.from_pretrained(straight.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.model_dir).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = lambda path: {m["step"]: m for m in read_metrics(path) if m["split"] == "train"}  # noqa: E731
    s, r = steps(straight.metrics_path), steps(resumed.metrics_path)
    assert sorted(r) == list(range(1, 7))
    for step in range(4, 7):
        assert r[step]["loss"] == s[step]["loss"] and r[step]["lr"] == s[step]["lr"], step


def test_output_dir_in_use_needs_resume(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1)
    posttrain.train(cfg)
    with pytest.raises(ValueError, match=r"output_dir: .* already holds files \(a finished run\); choose another"):
        posttrain.train(cfg)


def test_cached_reference_matches_copy_and_is_reused(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache gives the figures of a frozen copy; a second run reuses it instead of recomputing."""
    cache = tmp_path / "cache"
    cached = {"reference": {"kind": "cached", "cache_dir": str(cache)}, "max_steps": 3, **BIT_EXACT}
    copy_run = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "copy", max_steps=3, **BIT_EXACT))
    first = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "c1", **cached))
    assert "computed and cached" in "".join(capsys.readouterr())
    assert len(list(cache.glob("*.safetensors"))) == 1  # train and eval are the same pairs here: one key
    second = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "c2", **cached))
    assert "reused cache" in "".join(capsys.readouterr())
    a, b, c = (train_losses(r.metrics_path) for r in (copy_run, first, second))
    assert b == c
    assert_close_for_device(b, a, rel=1e-5, abs=1e-12, msg="cached against copy")


def test_summary_file(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    result = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2))
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["steps"] == 2
    for key in ("policy_margin", "policy_prefers_chosen", "accuracy", "loss"):
        assert key in summary["heldout_before"] and key in summary["heldout_after"]


def test_bf16_autocast_trains(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """precision: bf16 runs the forwards under autocast, keeps fp32 weights, and still learns."""
    result = posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "bf16", precision="bf16"))
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert after["loss"] < before["loss"] - 0.05
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_eval_size_holds_out_training_rows(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Without an eval file, data.eval_size rows are held out of training and evaluated on."""
    cfg = tiny_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2)
    cfg["data"] = {"train": str(pairs_file), "eval_size": 8, "max_length": 64, "max_prompt_length": 40}
    result = posttrain.train(cfg)
    evals = [m for m in read_metrics(result.metrics_path) if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [0, 2]
    # 24 pairs train (3 steps per epoch at batch 8): the epoch counter shows it.
    train = [m for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert train[-1]["epoch"] == pytest.approx(2 / 3)


def test_a_reward_model_cannot_start_a_policy(tmp_path: Path) -> None:
    """Loading a sequence classifier as a causal LM would leave a random LM head: a one-line error instead."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.config import ConfigError
    from posttrain.fixtures import build_model, build_tokenizer

    tok = build_tokenizer("chatml")
    config = build_model(tok).config
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.save_pretrained(tmp_path / "rm")
    with pytest.raises(ConfigError, match=r"is not a complete causal LM: .*lm_head.weight"):
        load_causal_lm(str(tmp_path / "rm"))


def test_resume_refuses_a_changed_config(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """A resumed run must be the saved run: a changed learning rate or max_steps is named, not ignored."""
    from posttrain.config import ConfigError

    cfg = tiny_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=2, save_steps=1)
    posttrain.train(cfg)
    with pytest.raises(ConfigError, match=r"--resume: the config differs .*learning_rate: 0.003 -> 0.001"):
        posttrain.train({**cfg, "learning_rate": 1e-3}, resume=True)
    with pytest.raises(ConfigError, match=r"max_steps: 2 -> 4"):
        posttrain.train({**cfg, "max_steps": 4}, resume=True)
    posttrain.train({**cfg, "logging_steps": 2}, resume=True)  # when to log is not part of the run


def test_resume_without_a_checkpoint_is_refused(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    from posttrain.config import ConfigError

    cfg = tiny_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=1)
    posttrain.train(cfg)
    with pytest.raises(ConfigError, match=r"holds a finished run but no checkpoint \(set save_steps"):
        posttrain.train(cfg, resume=True)


def test_several_processes_need_torchrun(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WORLD_SIZE without the rest of torchrun's rendezvous is a one-line error, before anything is written
    (a launch with torchrun is tested in test_distributed.py)."""
    from posttrain.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT unset: launch .*torchrun"):
        posttrain.train(tiny_config(tiny_model_dir, pairs_file, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_split_eval_keeps_source_rows_whole() -> None:
    """KTO splits a preference row into two records: both halves must land on the same side."""
    from posttrain.data.examples import UnpairedRecord
    from posttrain.training.offline import split_eval

    records = [UnpairedRecord((1,), (2,), i % 2 == 0, index=i, row=i // 2 + 1) for i in range(20)]
    train, held = split_eval(records, 5, seed=0)
    train_rows, held_rows = {r.row for r in train}, {r.row for r in held}
    assert not train_rows & held_rows and len(held) == 6  # three whole rows: 5 rounded up to pairs
    assert [r.index for r in held] == list(range(6)) and [r.index for r in train] == list(range(14))
