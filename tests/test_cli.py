"""The command line: ``data validate`` and the bad-input path of ``train`` (one stderr line, exit 2, no files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.bundled import build
from posttrain.cli import main
from posttrain.fixtures import save_tiny

BUNDLED_TRAIN = Path(build.__file__).resolve().parent / "prefs_train.jsonl"
GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(path: Path, **values: Any) -> Path:
    path.write_text(yaml.safe_dump({"method": "dpo", "batch_size": 2, **values}))
    return path


# ------------------------------------------------------------------------------------------ data validate


def test_validate_bundled_file(capsys: pytest.CaptureFixture[str]) -> None:
    n = sum(1 for line in BUNDLED_TRAIN.read_text().splitlines() if line.strip())
    code, out, err = run_cli(capsys, "data", "validate", str(BUNDLED_TRAIN))
    assert code == 0
    assert out == f"{BUNDLED_TRAIN}: {n} rows OK for dpo (string pairs)\n"
    assert err == ""


def test_validate_reports_shapes_and_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conversation = {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
    }
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, conversation])
    code, out, _ = run_cli(capsys, "data", "validate", str(path), "--method", "simpo")
    assert code == 0
    assert out == f"{path}: 2 rows OK for simpo (conversation, string pairs)\n"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([GOOD, {"prompt": "q", "chosen": "a"}], "row 2: field 'rejected': missing"),
        ([GOOD, GOOD, {"prompt": "q", "chosen": 5, "rejected": "b"}], "row 3: field 'chosen': expected a string"),
        (
            [GOOD, {"prompt": "q", "chosen": "same", "rejected": "same"}],
            "row 2: field 'rejected': identical to 'chosen'",
        ),
    ],
)
def test_validate_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[dict[str, Any]], expected: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    code, out, err = run_cli(capsys, "data", "validate", str(path))
    assert code == 2
    assert out == ""
    assert err.startswith(f"posttrain: error: {path}: {expected}")
    assert err.endswith("\n") and err.count("\n") == 1


def test_validate_missing_file_and_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.jsonl"
    assert run_cli(capsys, "data", "validate", str(missing)) == (
        2,
        "",
        f"posttrain: error: {missing}: file not found\n",
    )
    code, _, err = run_cli(capsys, "data", "validate", str(BUNDLED_TRAIN), "--method", "dpp")
    assert code == 2
    assert err.startswith("posttrain: error: --method: unknown method 'dpp'; one of dpo, ")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["data"], ["frobnicate"], ["train"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()


def test_python_m_posttrain_exit_code(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "q", "chosen": "a", "rejected": ""}])
    result = subprocess.run(
        [sys.executable, "-m", "posttrain", "data", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == f"posttrain: error: {path}: row 2: field 'rejected': empty\n"


# ----------------------------------------------------------------------------------- train: bad input


def train_fails(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> str:
    code, _, err = run_cli(capsys, "train", str(config), *extra)  # stdout may hold progress lines
    assert code == 2
    assert err.startswith("posttrain: error: ") and err.count("\n") == 1
    return err.removeprefix("posttrain: error: ").rstrip("\n")


def test_train_with_a_bad_data_row_writes_nothing(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, {"prompt": "q", "chosen": "a", "rejected": 3}])
    out_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", model=str(tiny_model_dir), output_dir=str(out_dir), data={"train": str(data)}
    )
    message = train_fails(capsys, config)
    assert message == f"{data}: row 3: field 'rejected': expected a string or a list of messages, got int"
    assert not out_dir.exists()


def test_train_with_a_bad_config_key_writes_nothing(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml",
        model=str(tiny_model_dir),
        output_dir=str(out_dir),
        data={"train": str(BUNDLED_TRAIN)},
        learning_rat=1e-6,
    )
    assert train_fails(capsys, config) == f"{config}: learning_rat: unknown key (did you mean 'learning_rate'?)"
    assert not out_dir.exists()
    # The same through --set: the config file is fine, the override is not.
    good = write_config(
        tmp_path / "good.yaml", model=str(tiny_model_dir), output_dir=str(out_dir), data={"train": str(BUNDLED_TRAIN)}
    )
    assert train_fails(capsys, good, "--set", "beta=0") == f"{good}: beta: must be > 0, got 0.0"
    assert train_fails(capsys, good, "--set", "gamma=1").endswith(
        "gamma: not a parameter of method 'dpo' (used by simpo, ppo)"
    )
    assert not out_dir.exists()


def test_train_with_a_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_fails(capsys, tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_train_chat_template_true_without_one_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "base-model"
    save_tiny(model, chat_template=None)  # a base model: its tokenizer has no chat template
    capsys.readouterr()  # (the save's progress bar)
    out_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml",
        model=str(model),
        output_dir=str(out_dir),
        data={"train": str(BUNDLED_TRAIN), "chat_template": True},
    )
    assert train_fails(capsys, config) == "data.chat_template: is true but the tokenizer has no chat template"
    assert not out_dir.exists()


def test_train_batch_larger_than_the_data_writes_nothing(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    out_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", model=str(tiny_model_dir), output_dir=str(out_dir), data={"train": str(data)}, batch_size=4
    )
    assert train_fails(capsys, config) == "batch_size: 4 is larger than the 2 training examples"
    assert not out_dir.exists()


def test_train_refuses_a_used_output_dir(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep")
    config = write_config(
        tmp_path / "c.yaml", model=str(tiny_model_dir), output_dir=str(out_dir), data={"train": str(BUNDLED_TRAIN)}
    )
    assert train_fails(capsys, config) == (
        f"output_dir: {out_dir} already holds files that no posttrain run marked as its own (precious.txt); empty it "
        "or choose another output_dir"
    )
    assert [p.name for p in out_dir.iterdir()] == ["precious.txt"]


@pytest.mark.parametrize(
    ("method", "row", "noun"),
    [
        ("kto", {"prompt": "p", "completion": "c", "label": True}, "examples"),
        ("sft", {"prompt": "p", "completion": "c"}, "examples"),
        ("reward", {"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs"),
    ],
)
def test_validate_reads_each_method_s_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, row: dict[str, object], noun: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert main(["data", "validate", str(path), "--method", method]) == 0
    assert capsys.readouterr().out == f"{path}: 1 rows OK for {method} (string {noun})\n"
