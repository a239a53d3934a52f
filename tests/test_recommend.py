"""``posttrain recommend``: shape detection, each quality signal on hand-made rows, ranking, loadable config."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain import config as config_module
from posttrain.algorithms import ALGORITHMS
from posttrain.cli import main
from posttrain.recommend import (
    Method,
    analyse,
    detect_shape,
    kto_weights,
    length_bias,
    score_margins,
    starting_config,
)

CONFIG_HEADER = "save as run.yaml and run `posttrain train run.yaml`\n"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def coming(name: str) -> str:
    """How a method is listed: plain when posttrain trains it now, else marked (computed, as the module does)."""
    return name if name in ALGORITHMS else f"{name} (coming)"


def checks(rows: list[dict[str, Any]]) -> dict[str, str]:
    return dict(analyse(rows, "rows.jsonl").checks)


def pair(prompt: str, chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def loads(out: str, tmp_path: Path) -> config_module.TrainConfig:
    """The printed config, with output_dir pointed into tmp_path, through the real config loader."""
    raw = yaml.safe_load(out.split(CONFIG_HEADER, 1)[1])
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config_module.load(path)


# ------------------------------------------------------------------------------------------------ shapes

USER, BOT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}
SHAPES = [
    ("standard pairs", [pair("Q?", "yes", "no")], "preference pairs (prompt, chosen, rejected)"),
    (
        "conversational pairs",
        [{"prompt": [USER], "chosen": [BOT], "rejected": [{"role": "assistant", "content": "Go."}]}],
        "preference pairs (prompt, chosen, rejected)",
    ),
    ("implicit prompt", [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}], "the prompt is their shared prefix"),
    ("scored pairs", [pair("Q?", "yes", "no", score_chosen=8, score_rejected=3)], "preference pairs"),
    ("unpaired", [{"prompt": "Q?", "completion": "yes", "label": True}], "unpaired binary feedback"),
    ("verifier", [{"prompt": "2+2?", "solution": "4"}], "prompts with a reference answer (verifier)"),
    ("prompt/completion", [{"prompt": "Q?", "completion": "A."}], "demonstrations"),
    ("messages", [{"messages": [USER, BOT]}], "demonstrations"),
]


@pytest.mark.parametrize(("name", "rows", "shape"), SHAPES, ids=[s[0] for s in SHAPES])
def test_each_shape_is_detected(
    name: str, rows: list[dict[str, Any]], shape: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    code, out, err = run_cli(capsys, "recommend", str(path))
    assert (code, err) == (0, "")
    assert out.splitlines()[1].startswith("shape:   ") and shape in out.splitlines()[1]


def test_shape_rules_first_match_wins() -> None:
    """Pairs beat everything; a completion makes prompt + answer demonstrations, and a label makes it KTO."""
    assert detect_shape(["prompt", "chosen", "rejected", "completion", "label"]) == "preference"
    assert detect_shape(["prompt", "completion", "label", "answer"]) == "unpaired"
    assert detect_shape(["prompt", "completion", "answer"]) == "demonstrations"
    assert detect_shape(["prompt", "ground_truth"]) == "verifier"
    assert detect_shape(["prompt"]) is None
    assert detect_shape(["chosen"]) is None


def test_unknown_shape_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Q?", "reply": "A."}])
    code, out, err = run_cli(capsys, "recommend", str(path))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith(f"posttrain: error: {path}: cannot tell the data's shape from its columns (question, reply)")


def test_empty_file_and_non_object_rows_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli(capsys, "recommend", str(empty))[::2] == (2, f"posttrain: error: {empty}: no rows\n")
    listed = write_jsonl(tmp_path / "list.jsonl", [["a", "b"]])  # type: ignore[list-item]
    code, _, err = run_cli(capsys, "recommend", str(listed))
    assert (code, err) == (2, f"posttrain: error: {listed}: row 1: expected an object with named fields, got list\n")


# ----------------------------------------------------------------------------------------------- signals


def test_length_bias_three_of_four_longer() -> None:
    """Chosen lengths 4, 4, 4, 1 vs rejected 2, 2, 2, 6: 3 of 4 longer (75% > 60%); means 13/4 = 3.25 and
    12/4 = 3.0, ratio 1.0833 (< 1.3): flagged by the share alone."""
    lb = length_bias([("aaaa", "bb"), ("cccc", "dd"), ("eeee", "ff"), ("g", "hhhhhh")])
    assert (lb.n, lb.chosen_longer, lb.rejected_longer) == (4, 3, 1)
    assert (lb.mean_chosen, lb.mean_rejected) == (3.25, 3.0)
    assert lb.ratio == pytest.approx(13 / 12, rel=1e-12)
    assert lb.biased


def test_length_bias_by_ratio_and_the_boundaries() -> None:
    """By the ratio alone: 1 of 2 longer (50%), means 55 vs 15, ratio 3.67. Exactly 60% (3 of 5) with
    lengths 8 vs 7 in all (ratio 1.14) is not flagged: the share limit is strict."""
    by_ratio = length_bias([("x" * 100, "y" * 10), ("x" * 10, "y" * 20)])
    assert (by_ratio.chosen_longer, by_ratio.ratio) == (1, 55 / 15)
    assert by_ratio.biased
    at_limit = length_bias([("bb", "a"), ("bb", "a"), ("bb", "a"), ("a", "bb"), ("a", "bb")])
    assert at_limit.chosen_longer == 3
    assert at_limit.ratio == pytest.approx(8 / 7, rel=1e-12)
    assert not at_limit.biased


def test_pair_checks_on_hand_made_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """5 rows: row 2 copies row 1 (1 duplicate row, prompt 'a' repeated), row 3 is a tie, row 4 has an empty
    chosen. Lengths over the 4 non-empty pairs: chosen longer in rows 1, 2 and 5 (3 of 4 = 75%)."""
    rows = [
        pair("a", "long answer", "short"),
        pair("a", "long answer", "short"),
        pair("b", "same", "same"),
        pair("c", "", "x"),
        pair("d", "longer one", "short"),
    ]
    got = checks(rows)
    assert got["rows with an empty field (prompt, chosen, rejected)"] == "1 (20.0%)"
    assert got["duplicate rows"] == "1 (20.0%)"
    assert got["rows repeating a prompt"] == "1 (20.0%)"
    assert got["chosen == rejected"] == "1 (20.0%)"
    assert got["chosen longer / rejected longer"] == "3 (75.0%) / 0 (0.0%)"
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    _, out, _ = run_cli(capsys, "recommend", str(path))
    for warning in ("only 5 rows (fewer than 100)", "1 rows have an empty", "1 rows are exact copies", "1 pairs have"):
        assert f"  - {warning}" in out
    assert "  - length bias: chosen is longer in 75% of pairs" in out
    assert "  1. simpo" in out  # length bias puts the length-normalised, reference-free method first


def test_implicit_prompt_lengths_are_of_the_completions() -> None:
    """'Q: hi A: yes!' vs 'Q: hi A: no': the shared prefix 'Q: hi A: ' is the prompt; completions 'yes!' (4)
    and 'no' (2)."""
    got = checks([{"chosen": "Q: hi A: yes!", "rejected": "Q: hi A: no"}])
    assert got["mean length chosen, rejected"] == "4.0, 2.0 chars (ratio 2.00)"


def test_score_margins_exact() -> None:
    """Scores (2, 0), (0, 2), (1, 1), (1.02, 0.98): pooled mean 1, population variance (4 * 1 + 2 * 0.0004) / 8
    = 0.5001, std 0.70718, threshold 0.070718. Margins 2 (clean), -2 (inverted), 0 (tie), 0.04 (tiny).
    Unreliable 3/4; flip rate (0.5 * 2 + 1) / 4 = 0.5."""
    m = score_margins([(2, 0), (0, 2), (1, 1), (1.02, 0.98)])
    assert m.std == pytest.approx(math.sqrt(0.5001), rel=1e-12)
    assert m.threshold == pytest.approx(0.1 * math.sqrt(0.5001), rel=1e-12)
    assert (m.n, m.ties, m.tiny, m.inverted) == (4, 1, 1, 1)
    assert (m.unreliable, m.flip_rate) == (0.75, 0.5)


def test_noisy_scores_rank_conservative_dpo_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rows of test_score_margins_exact: noisy (75% > 10%), flip rate 0.5 capped at 0.4 for label_smoothing."""
    scores = [(2, 0), (0, 2), (1, 1), (1.02, 0.98)]
    rows = [pair(f"p{i}", "good", "poor", score_chosen=c, score_rejected=r) for i, (c, r) in enumerate(scores)]
    got = checks(rows)
    assert (got["score ties"], got["chosen scored lower"]) == ("1 (25.0%)", "1 (25.0%)")
    assert got["tiny margins, 0 < |m| < 0.0707"] == "1 (25.0%)"
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    code, out, _ = run_cli(capsys, "recommend", str(path))
    assert code == 0
    assert "  - noisy labels: 75% of scored pairs" in out
    methods = [line.split()[1] for line in out.splitlines() if line.startswith(("  1.", "  2.", "  3."))]
    assert methods == ["cdpo", "robust_dpo", "dpo"]
    cfg = loads(out, tmp_path)
    assert (cfg.method, cfg.algorithm.label_smoothing) == ("cdpo", 0.4)  # type: ignore[attr-defined]


def test_scores_from_csv_strings_and_other_column_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "scored.csv"
    path.write_text("prompt,chosen,rejected,chosen_rating,rejected_rating\na,x,y,5,5\nb,x,y,9,1\n")
    code, out, _ = run_cli(capsys, "recommend", str(path))
    assert code == 0
    assert "chosen_rating, rejected_rating (2 scored pairs" in out
    assert "score ties" in out and "1 (50.0%)" in out


def test_a_margin_on_every_row_lists_distill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [pair(f"p{i}", "good", "poor", margin=m) for i, m in enumerate([0.5, 1.0, 0.25])]
    listed = [line.split()[1] for line in run_cli(capsys, "recommend", str(write_jsonl(tmp_path / "m.jsonl", rows)))[1]
              .splitlines() if line[:4].strip().rstrip(".").isdigit()]  # fmt: skip
    assert listed[:2] == ["dpo", "distill"], listed
    rows[1].pop("margin")
    out = run_cli(capsys, "recommend", str(write_jsonl(tmp_path / "some.jsonl", rows)))[1]
    assert " distill " not in out


def test_kto_weights_put_the_ratio_in_range() -> None:
    """1 desirable to 3 undesirable: lambda_D = 3 gives ratio 1. 4 to 1: lambda_U = 4 / (4/3) = 3 gives 4/3.
    In range already (1.11): 1:1. Every split up to 60 rows lands in [1, 4/3]."""
    assert kto_weights(1, 3) == (3.0, 1.0)
    assert kto_weights(4, 1) == (1.0, 3.0)
    assert kto_weights(10, 9) == (1.0, 1.0)
    for n_d in range(1, 61):
        for n_u in range(1, 61):
            lam_d, lam_u = kto_weights(n_d, n_u)
            ratio = Fraction(str(lam_d)) * n_d / (Fraction(str(lam_u)) * n_u)  # exact, as the decimals read
            assert 1 <= ratio <= Fraction(4, 3), (n_d, n_u)


def test_unpaired_balance_and_pairable_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Labels True, False, False, False (one a CSV-style string): 1 desirable to 3 undesirable; prompt 'a' has
    both labels, so 1 prompt could be paired for DPO."""
    rows = [
        {"prompt": "a", "completion": "good", "label": True},
        {"prompt": "a", "completion": "bad", "label": False},
        {"prompt": "b", "completion": "bad", "label": "false"},
        {"prompt": "c", "completion": "bad", "label": False},
    ]
    got = checks(rows)
    assert got["desirable / undesirable"] == "1 / 3"
    assert got["suggested KTO weights"] == "lambda_D 3.0, lambda_U 1.0 (ratio 1.00)"
    assert got["prompts with both labels"] == "1"
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    _, out, _ = run_cli(capsys, "recommend", str(path))
    assert f"  1. {coming('kto')}" in out
    assert f"  2. {coming('dpo')}" in out and "1 prompts have both labels" in out


# ------------------------------------------------------------------------------------- ranking, configs


def test_bundled_pairs_recommend_dpo_without_length_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "recommend", "bundled:prefs_train.jsonl")
    assert (code, err) == (0, "")
    assert "rows:    512" in out
    assert "length bias" not in out
    assert "\nwarnings\n  none\n" in out
    assert "  1. dpo " in out
    cfg = loads(out, tmp_path)
    assert cfg.method == "dpo"
    assert cfg.algorithm.beta == 0.1  # type: ignore[attr-defined]
    assert cfg.data.train == "bundled:prefs_train.jsonl"
    assert cfg.model == "embedded:smollm2-135m-instruct"


def test_length_biased_config_is_reference_free_simpo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [pair(f"p{i}", "a much longer chosen answer", "short") for i in range(4)]
    _, out, _ = run_cli(capsys, "recommend", str(write_jsonl(tmp_path / "long.jsonl", rows)))
    cfg = loads(out, tmp_path)
    assert (cfg.method, cfg.reference.kind, cfg.batch_size) == ("simpo", "none", 4)
    assert (cfg.algorithm.beta, cfg.algorithm.gamma) == (2.0, 1.0)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("rows", "top"),
    [
        ([{"prompt": "Q?", "completion": "A."}], "sft"),
        ([{"prompt": "2+2?", "answer": "4"}], "grpo"),
        ([{"prompt": "Q?", "completion": "A.", "label": True}], "kto"),
    ],
)
def test_other_shapes_config_loads_once_their_method_lands(
    rows: list[dict[str, Any]], top: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Methods posttrain cannot train yet are marked (coming) and get a sketch; available ones a loadable config."""
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    _, out, _ = run_cli(capsys, "recommend", str(path))
    assert f"  1. {coming(top)} " in out
    if top in ALGORITHMS:
        assert loads(out, tmp_path).method == top
    else:
        assert f"starting config for {top} (coming:" in out
        assert yaml.safe_load(out.split("a sketch)\n", 1)[1])["data"] == {"train": str(path)}


def test_availability_is_looked_up_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(ALGORITHMS, "kto", raising=False)
    assert not Method("kto", "").available
    monkeypatch.setitem(ALGORITHMS, "kto", ALGORITHMS["dpo"])
    assert Method("kto", "").available


def test_starting_config_takes_every_hyperparameter_of_the_class() -> None:
    report = analyse([pair("a", "yes", "nah")] * 2, "p.jsonl")
    config = starting_config(report, split="test")
    assert config["data"] == {"train": "p.jsonl", "split": "test"}
    assert config["batch_size"] == 2
    assert {k: config[k] for k in ("method", "beta", "rpo_alpha")} == {"method": "dpo", "beta": 0.1, "rpo_alpha": 0.0}
