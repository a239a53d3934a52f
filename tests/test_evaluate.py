"""posttrain eval: a finished run's model scored against its reference reproduces the run's final
held-out figures, from the run directory alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import posttrain
from posttrain.cli import main
from posttrain.evaluate import evaluate_run

BUNDLED = Path(posttrain.__file__).parent / "bundled" / "prefs_train.jsonl"


def test_eval_of_a_run_dir_reproduces_the_final_figures(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:16]))
    config = {
        "method": "dpo", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "max_steps": 3, "batch_size": 8, "learning_rate": 3e-3,
    }  # fmt: skip
    result = posttrain.train(config)
    figures = evaluate_run(str(result.output_dir))
    after = result.summary["heldout_after"]
    for key in ("loss", "accuracy", "margins", "policy_chosen_logps", "ref_rejected_logps", "policy_margin"):
        assert figures[key] == pytest.approx(after[key], rel=1e-5, abs=1e-7), key
    assert figures["rows"] == 16 and figures["method"] == "dpo"
    capsys.readouterr()
    assert main(["eval", str(result.output_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(after["accuracy"])


def test_eval_without_eval_data_is_a_one_line_error(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: dpo\nmodel: {tiny_model_dir}\ndata: {{train: x.jsonl}}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["eval", str(cfg)]) == 2
    assert (
        capsys.readouterr().err.strip() == "posttrain: error: data.eval: the config has no eval data; pass --data FILE"
    )


def test_eval_of_an_online_run_compares_samples_with_the_reference(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Generation-based eval of a GRPO run: win rate, distributions and sampled KL. The starting model
    against itself (the same weights, the same seed) draws the same samples: every pair ties and the KL
    estimates are exactly 0; the trained model has moved, so its k3 KL is positive."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Question {i}: say yes.", "answer": "1"}) + "\n" for i in range(8))
    )
    config = {
        "method": "grpo", "model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
        "data": {"train": str(prompts), "eval": str(prompts), "max_length": 64},
        "rewards": [{"name": "length_penalty", "target_chars": 0, "coef": 0.1}],
        "generation": {"max_new_tokens": 6}, "num_generations": 4, "batch_size": 4, "max_steps": 2,
        "learning_rate": 1e-2, "beta": 0.0,
    }  # fmt: skip
    run = posttrain.train(config).output_dir
    same = evaluate_run(str(run), model=str(tiny_model_dir), samples=3)
    assert same["prompts"] == 8 and same["samples_per_prompt"] == 3
    assert (same["ties"], same["win_rate"], same["kl_seq"], same["kl_token_k3"]) == (1.0, 0.5, 0.0, 0.0)
    assert same["policy"] == same["reference"]
    moved = evaluate_run(str(run), samples=3)
    assert moved["wins"] + moved["ties"] + moved["losses"] == pytest.approx(1.0)
    assert moved["kl_token_k3"] > 0.0
    assert set(moved["policy"]) == {"reward", "completion_length", "truncated", "reward/length_penalty"}
    assert set(moved["policy"]["reward"]) == {"mean", "std", "p10", "p50", "p90"}
    greedy = evaluate_run(str(run), samples=1, temperature=0.0)
    assert "kl_seq" not in greedy  # greedy answers are not samples of the policy: no KL estimate
    capsys.readouterr()
    assert main(["eval", str(run), "--samples", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["samples_per_prompt"] == 2
