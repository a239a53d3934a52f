"""method: reward end to end on the tiny model: the optional margin column, the distinct pad token, training
that learns, resume, accumulation, and the saved model scoring as in training with plain transformers and
through :class:`RewardModelScorer`."""

from __future__ import annotations

import copy
import csv
import doctest
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support import BIT_EXACT, killed_after_first_checkpoint, run_config
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import posttrain
from posttrain.config import load
from posttrain.data.collate import collate_pairs
from posttrain.data.examples import PreferenceExample, PreferenceRecord
from posttrain.data.formats import DataError, load_preference, preference_example
from posttrain.data.tokenize import Renderer, tokenize_preferences
from posttrain.fixtures import build_model, build_tokenizer
from posttrain.model.load import REWARD_PAD_TOKEN, add_distinct_pad, load_tokenizer
from posttrain.rewards import RewardModelScorer
from posttrain.training.metrics import MetricSums, read_metrics
from posttrain.training.offline import split_eval
from posttrain.training.reward import RewardTask

BUNDLED = Path(posttrain.__file__).parent / "bundled" / "prefs_train.jsonl"
OBJECTS = ["a book", "the answer", "a question", "the number", "an apple", "the story", "a letter", "the dog"]
VERBS = ["find", "read", "write", "see", "help with", "answer", "make", "know"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 32 bundled arithmetic pairs."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:32]))
    return path


@pytest.fixture(scope="module")
def style_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A learnable signal with a real hold-out: 48 prompts, the chosen answer agrees to help, the rejected
    one refuses. Train on the first 32 prompts, evaluate on the 16 others (never seen in training)."""
    rows = [
        {"prompt": f"Can you {verb} {obj}?", "chosen": f"Yes, I will {verb} {obj}.", "rejected": "No."}
        for verb in VERBS
        for obj in OBJECTS
    ][:48]
    root = tmp_path_factory.mktemp("style")
    return write_jsonl(root / "train.jsonl", rows[:32]), write_jsonl(root / "heldout.jsonl", rows[32:])


@pytest.fixture(scope="module")
def eos_pad_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chatml model with its tokenizer's pad token set to EOS (as SmolLM2's is): the reward task
    must add a pad token of its own and grow the embeddings."""
    tokenizer = build_tokenizer("chatml")
    tokenizer.pad_token = tokenizer.eos_token
    model = build_model(tokenizer)
    path = tmp_path_factory.mktemp("tiny") / "llama-chatml-eos-pad"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def reward_config(model: Path, train: Path, out: Path, eval_file: Path | None = None, **extra: Any) -> dict[str, Any]:
    return run_config("reward", model, train, out, eval_file, **extra)


def make_task(config: dict[str, Any]) -> RewardTask:
    loaded = load(config)
    return RewardTask(loaded, load_tokenizer(loaded.model), torch.device("cpu"))


def scores_of(task: RewardTask, model: torch.nn.Module, records: list[PreferenceRecord], micro: int = 8) -> Any:
    """(chosen, rejected) scores of all records, (N,) each, in micro-batches as the loop evaluates."""
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(records), micro):
            c, r = task.score(model, task.collate(records[start : start + micro]))
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


# ------------------------------------------------------------------------------------------------------
# The optional margin column


def test_margin_column_is_read_and_absent_is_none(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -0.5},
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": None},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    examples = load_preference(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert [e.margin for e in examples] == [2.0, -0.5, None, None]
    assert isinstance(examples[0].margin, float)


def test_margin_column_from_csv_cells(tmp_path: Path) -> None:
    """CSV cells are text: a number in one is read as a number, an empty cell is no margin."""
    path = tmp_path / "m.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected", "margin"])
        writer.writeheader()
        writer.writerow({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "1.5"})
        writer.writerow({"prompt": "p", "chosen": "a", "rejected": "b", "margin": ""})
    assert [e.margin for e in load_preference(str(path))] == [1.5, None]


@pytest.mark.parametrize(
    ("margin", "expected"),
    [
        ("big", "prefs.jsonl: row 7: field 'margin': expected a number, got 'big'"),
        (True, "prefs.jsonl: row 7: field 'margin': expected a number, got bool"),
        ([1.0], "prefs.jsonl: row 7: field 'margin': expected a number, got list"),
        (math.inf, "prefs.jsonl: row 7: field 'margin': must be finite, got inf"),
        ("nan", "prefs.jsonl: row 7: field 'margin': must be finite, got nan"),
    ],
)
def test_bad_margin_is_a_one_line_error_naming_file_row_and_field(margin: Any, expected: str) -> None:
    with pytest.raises(DataError) as info:
        preference_example("prefs.jsonl", 7, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": margin})
    assert str(info.value) == expected


def test_margin_is_carried_through_tokenization_and_the_eval_split(tiny_tokenizer: Any) -> None:
    examples = [PreferenceExample("p", "a", "b", row=i + 1, margin=None if i % 2 else float(i)) for i in range(6)]
    records, _ = tokenize_preferences(examples, Renderer(tiny_tokenizer), max_length=32, max_prompt_length=16)
    assert [r.margin for r in records] == [0.0, None, 2.0, None, 4.0, None]
    train, evals = split_eval(records, 2, seed=0)
    assert sorted((r.margin for r in train + evals), key=str) == sorted((r.margin for r in records), key=str)


def test_collate_pairs_doctest_runs() -> None:
    module = importlib.import_module("posttrain.data.collate")
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0


def test_collate_without_any_margin_gives_none() -> None:
    batch = collate_pairs([PreferenceRecord((1,), (2,), (3,), index=0)], pad_id=0)
    assert batch.margin is None
    assert batch.num_pairs == 1 and batch.input_ids.shape == (2, 2)


def test_margin_shifts_the_loss_as_computed_by_hand(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With the score head zeroed every reward is 0, so each pair's loss is softplus(m) = log(1 + e^m):
    m = 1, -1, none (0), 2 -> 1.3132616875, 0.3132616875, 0.6931471806, 2.1269280110;
    their mean over the 4 pairs is 4.4465985666 / 4 = 1.1116496417 (without margins: log 2)."""
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "margin": 1},
        {"prompt": "What is 3 + 3?", "chosen": "6", "rejected": "7", "margin": -1},
        {"prompt": "What is 4 + 4?", "chosen": "8", "rejected": "9"},
        {"prompt": "What is 5 + 5?", "chosen": "10", "rejected": "11", "margin": 2},
    ]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    task = make_task(reward_config(tiny_model_dir, data, tmp_path / "unused"))
    records, _ = task.load_records(str(data), "train")
    model = task.load_model(str(tiny_model_dir)).double()
    with torch.no_grad():
        model.score.weight.zero_()
    counts = task.counts(records)
    with_margin = task.loss(model, task.collate(records), "train", counts, MetricSums(), None)
    assert float(with_margin.detach()) == pytest.approx(1.1116496417, rel=1e-9)
    plain = [PreferenceRecord(r.prompt_ids, r.chosen_ids, r.rejected_ids, r.index) for r in records]
    without = task.loss(model, task.collate(plain), "train", counts, MetricSums(), None)
    assert float(without.detach()) == pytest.approx(math.log(2), rel=1e-12)


# ------------------------------------------------------------------------------------------------------
# The pad token


def test_pad_distinct_from_eos_after_setup(eos_pad_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    task = make_task(reward_config(eos_pad_model_dir, pairs_file, tmp_path / "unused"))
    tokenizer = task.tokenizer
    assert tokenizer.pad_token == REWARD_PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.pad_token_id == len(tokenizer) - 1
    model = task.load_model(str(eos_pad_model_dir))
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.num_labels == 1 and type(model).__name__ == "LlamaForSequenceClassification"
    records, _ = task.load_records(str(pairs_file), "train")
    batch = task.collate(records[:4])
    real = batch.input_ids[batch.attention_mask.bool()]
    assert tokenizer.pad_token_id not in real.tolist()  # only padding carries the pad id
    assert tokenizer.eos_token_id in real.tolist()  # EOS (<|im_end|>) is real text inside every row


def test_a_tokenizer_with_a_distinct_pad_is_left_alone(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    task = make_task(reward_config(tiny_model_dir, pairs_file, tmp_path / "unused"))
    assert task.tokenizer.pad_token == "<pad>" and len(task.tokenizer) == 512


def test_add_distinct_pad_cases(tiny_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    assert add_distinct_pad(tokenizer) is False  # <pad> is neither EOS nor used
    assert add_distinct_pad(tokenizer, avoid={tokenizer.pad_token_id}) is True  # a pad that texts contain
    assert tokenizer.pad_token == REWARD_PAD_TOKEN
    assert add_distinct_pad(tokenizer) is False  # idempotent


@pytest.mark.filterwarnings("error::FutureWarning")  # the name transformers deprecates is not the one called
def test_gradient_checkpointing_is_honoured(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    task = make_task(reward_config(tiny_model_dir, pairs_file, tmp_path / "unused", gradient_checkpointing=True))
    model = task.load_model(str(tiny_model_dir))
    assert [n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]


# ------------------------------------------------------------------------------------------------------
# Training


def test_reward_model_learns_a_held_out_signal(
    tiny_model_dir: Path, style_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """On 16 prompts never trained on, accuracy goes from chance or below to (nearly) every pair; the loss
    falls."""
    train, heldout = style_files
    result = posttrain.train(reward_config(tiny_model_dir, train, tmp_path / "run", heldout, max_steps=10))
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert after["loss"] < before["loss"] - 0.2, (before["loss"], after["loss"])
    assert after["accuracy"] >= 0.9 > before["accuracy"] + 0.2, (before["accuracy"], after["accuracy"])
    assert after["margins"] > before["margins"] + 0.5
    losses = [m["loss"] for m in read_metrics(result.metrics_path) if m["split"] == "train"]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2


def test_reward_model_fits_the_arithmetic_pairs(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """The bundled arithmetic pairs (a one-digit difference), trained and evaluated on the same 32."""
    result = posttrain.train(reward_config(tiny_model_dir, pairs_file, tmp_path / "run", max_steps=24))
    before, after = result.summary["heldout_before"], result.summary["heldout_after"]
    assert after["loss"] < before["loss"] - 0.05, (before["loss"], after["loss"])
    assert after["accuracy"] > before["accuracy"] + 0.2, (before["accuracy"], after["accuracy"])


def _grads_after(micro_batch_size: int, model_dir: Path, data: Path) -> dict[str, torch.Tensor]:
    task = make_task(reward_config(model_dir, data, Path("unused"), micro_batch_size=micro_batch_size))
    records, _ = task.load_records(str(data), "train")
    torch.manual_seed(0)  # the same new score head in both runs
    model = task.load_model(str(model_dir)).double()
    counts = task.counts(records[:8])
    for start in range(0, 8, micro_batch_size):
        batch = task.collate(records[start : start + micro_batch_size])
        task.loss(model, batch, "train", counts, MetricSums(), None).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_1x8_equals_8x1(eos_pad_model_dir: Path, pairs_file: Path) -> None:
    """Eight micro-batches of one pair (no padding at all) give the gradient of one padded batch of eight."""
    whole = _grads_after(8, eos_pad_model_dir, pairs_file)
    split = _grads_after(1, eos_pad_model_dir, pairs_file)
    assert whole.keys() == split.keys() and "score.weight" in whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-9, atol=1e-12, msg=name)


def test_resume_equals_uninterrupted(
    eos_pad_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming loads the step-2 checkpoint, itself a sequence classifier with the grown vocabulary."""
    extra = {"max_steps": 4, "save_steps": 2, **BIT_EXACT}
    straight = posttrain.train(reward_config(eos_pad_model_dir, pairs_file, tmp_path / "straight", **extra))
    cfg = reward_config(eos_pad_model_dir, pairs_file, tmp_path / "resumed", **extra)
    killed_after_first_checkpoint(lambda: posttrain.train(cfg), monkeypatch)
    resumed = posttrain.train(cfg, resume=True)
    a = AutoModelForSequenceClassification.from_pretrained(straight.model_dir).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(resumed.model_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lora_trains_the_new_score_head_and_saves_a_plain_classifier(
    tiny_model_dir: Path, style_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """With LoRA (peft task type SEQ_CLS) the new score head trains whole next to the adapters, and the
    merged final model is a plain one-output sequence classifier."""
    pytest.importorskip("peft")
    train, heldout = style_files
    cfg = reward_config(tiny_model_dir, train, tmp_path / "run", heldout, max_steps=10, lora={"r": 8})
    result = posttrain.train(cfg)
    assert result.summary["heldout_after"]["accuracy"] > result.summary["heldout_before"]["accuracy"] + 0.5
    saved = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert not [name for name in saved.state_dict() if "lora" in name]
    torch.manual_seed(0)  # what the loop does before loading: the same fresh head
    start = make_task(cfg).load_model(str(tiny_model_dir))
    assert not torch.equal(saved.score.weight, start.score.weight)


# ------------------------------------------------------------------------------------------------------
# The saved model


@pytest.fixture(scope="module")
def trained(eos_pad_model_dir: Path, pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A short run from the EOS-padded model (so the saved tokenizer carries the added pad token)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    result = posttrain.train(reward_config(eos_pad_model_dir, pairs_file, out, max_steps=6))
    return result


PLAIN_SCORES = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, rows = sys.argv[1], json.loads(sys.stdin.read())
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
assert 'posttrain' not in sys.modules
tokenizer.padding_side = 'right'
batch = tokenizer.pad({'input_ids': rows}, return_tensors='pt')
with torch.no_grad():
    padded = model(**batch).logits.squeeze(-1).tolist()
    alone = [model(input_ids=torch.tensor([r])).logits.item() for r in rows]
print(json.dumps({'padded': padded, 'alone': alone, 'pad': tokenizer.pad_token, 'eos': tokenizer.eos_token,
                  'pad_id': tokenizer.pad_token_id, 'config_pad_id': model.config.pad_token_id}))
"""


def test_saved_model_scores_as_in_training_with_plain_transformers(trained: Any, pairs_file: Path) -> None:
    """Plain transformers (no posttrain import) loads model/ and its tokenizer; a right-padded batch and each
    row alone get the scores of the final evaluation, and the tokenizer carries the new pad token."""
    config = load(trained.output_dir / "config.yaml")
    task = RewardTask(config, load_tokenizer(config.model), torch.device("cpu"))
    records, _ = task.load_records(str(pairs_file), "train")
    rows = [list(r.prompt_ids + r.chosen_ids) for r in records[:6]] + [
        list(r.prompt_ids + r.rejected_ids) for r in records[:6]
    ]
    assert len({len(r) for r in rows}) > 1  # the batch really is padded
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_SCORES, str(trained.model_dir)],
        input=json.dumps(rows), check=True, capture_output=True, text=True,
    )  # fmt: skip
    plain = json.loads(run.stdout.strip().splitlines()[-1])
    assert plain["pad"] == REWARD_PAD_TOKEN and plain["pad"] != plain["eos"]
    assert plain["pad_id"] == plain["config_pad_id"] == task.tokenizer.pad_token_id
    torch.testing.assert_close(torch.tensor(plain["padded"]), torch.tensor(plain["alone"]), rtol=1e-5, atol=1e-5)
    # The same scores as posttrain's training-time forward on the reloaded weights ...
    model = AutoModelForSequenceClassification.from_pretrained(trained.model_dir).eval()
    chosen, rejected = scores_of(task, model, records[:6], micro=6)
    torch.testing.assert_close(torch.tensor(plain["padded"]), torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-6)
    # ... and those weights are the trained ones: they reproduce the final evaluation's figures.
    chosen, rejected = scores_of(task, model, records)
    after = trained.summary["heldout_after"]
    assert float(chosen.double().mean()) == pytest.approx(after["chosen_rewards"], rel=1e-5, abs=1e-6)
    assert float((chosen > rejected).double().mean()) == pytest.approx(after["accuracy"])


def test_scorer_gives_the_training_time_scores(trained: Any, pairs_file: Path) -> None:
    """RewardModelScorer renders (prompt, completion) as training did and returns the same scores."""
    config = load(trained.output_dir / "config.yaml")
    task = RewardTask(config, load_tokenizer(config.model), torch.device("cpu"))
    records, _ = task.load_records(str(pairs_file), "train")
    model = AutoModelForSequenceClassification.from_pretrained(trained.model_dir).eval()
    chosen, rejected = scores_of(task, model, records[:10])
    examples = load_preference(str(pairs_file))[:10]
    scorer = RewardModelScorer(str(trained.model_dir), batch_size=3, device="cpu", max_length=64, max_prompt_length=40)
    prompts = [e.prompt for e in examples]
    got_chosen = scorer(prompts, [e.chosen for e in examples], task=["ignored"] * 10)
    got_rejected = scorer(prompts, [e.rejected for e in examples])
    assert all(isinstance(s, float) for s in got_chosen) and len(got_chosen) == 10
    torch.testing.assert_close(torch.tensor(got_chosen), chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got_rejected), rejected, rtol=1e-5, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(trained.model_dir)
    assert scorer.pad_id == tokenizer.pad_token_id


def test_scorer_rejects_mismatched_lengths(trained: Any) -> None:
    scorer = RewardModelScorer(str(trained.model_dir), device="cpu")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        scorer(["a", "b"], ["c"])
