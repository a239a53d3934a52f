"""Bad input, tried as a new user would: every case one line ``posttrain: error: ...`` naming the file, row,
field or key, a non-zero exit, no traceback, and nothing half written in the output folder.

Config cases fail before any model loads (their configs name a model folder that does not exist: the error
they get shows that it was never read). Models: tests/test_faults_models.py; rewards:
tests/test_faults_rewards.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import ConfigError, from_dict

PAIRS = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(4)]
UNREAD_MODEL = "/nonexistent/never-read-model"  # refused after every other config check: those come first
BAD_UTF8 = b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'


def fails(capsys: pytest.CaptureFixture[str], *argv: str, status: int = 2) -> str:
    """Run the CLI; assert the exit status and one error line without a traceback; return its message. Once a
    model loads, stderr holds progress bars too (transformers' "Loading weights"): the error is the one line
    that is not one of them; refused before anything loads, stderr holds that line alone."""
    code = main(list(argv))
    _, err = capsys.readouterr()
    assert code == status, err
    assert "Traceback" not in err
    errors = [line for line in re.split(r"[\r\n]", err) if "posttrain: error: " in line]
    assert len(errors) == 1 and errors[0].startswith("posttrain: error: "), err
    if "%|" not in err:  # no progress bar: nothing but the error
        assert err == errors[0] + "\n", err
    return errors[0].removeprefix("posttrain: error: ")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config_file(tmp_path: Path, model: str | Path = UNREAD_MODEL, **values: Any) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    raw = {"method": "dpo", "model": str(model), "output_dir": str(tmp_path / "run"), "data": {"train": str(data)}}
    raw.update({"batch_size": 2, "max_steps": 1, **values})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- config

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": INF}, "learning_rate: must be a finite number, got inf"),
        ({"beta": INF}, "beta: must be a finite number, got inf"),
        ({"adam_eps": INF}, "adam_eps: must be a finite number, got inf"),
        ({"beta": NAN}, "beta: must be a finite number, got nan"),
        ({"warmup_ratio": -INF}, "warmup_ratio: must be a finite number, got -inf"),
        ({"max_grad_norm": INF}, "max_grad_norm: must be a finite number, got inf"),
        ({"adam_betas": [0.9, INF]}, "adam_betas[1]: must be a finite number, got inf"),
        ({"lora": {"alpha": INF}}, "lora.alpha: must be a finite number, got inf"),
        ({"epochs": "1e999"}, "epochs: must be a finite number, got inf"),  # YAML 1.1 reads 1e999 as a string
        ({"batch_size": "two"}, "batch_size: expected an integer, got 'two'"),
        ({"batch_size": 2.5}, "batch_size: expected an integer, got 2.5"),
        ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
        ({"max_steps": -1}, "max_steps: must be >= 1, got -1"),
        ({"data": "pairs.jsonl"}, "data: expected a mapping, got 'pairs.jsonl'"),
        ({"data": {"train": "x.jsonl", "max_length": 0}}, "data.max_length: must be >= 2, got 0"),
        ({"method": "dpx"}, "method: unknown method 'dpx' (did you mean 'dpo'?); one of dpo, "),
        ({"method": ["dpo"]}, "method: expected a string, one of dpo, "),
        ({"seed": 2**40}, "seed: must be in [0, 2**32), got 1099511627776"),
        ({"seed": -1}, "seed: must be in [0, 2**32), got -1"),
        ({"precision": "fp16"}, "precision: must be one of fp32, bf16; got 'fp16'"),
        ({"trust_remote_code": "yes"}, "trust_remote_code: expected true or false, got 'yes'"),
        ({"learning_rat": 1e-6}, "learning_rat: unknown key (did you mean 'learning_rate'?)"),
    ],
)
def test_bad_config_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], values: Any, message: str) -> None:
    config = config_file(tmp_path, **values)
    assert fails(capsys, "train", str(config)).startswith(f"{config}: {message}")
    assert_nothing_written(tmp_path)


def test_every_float_key_refuses_non_finite_numbers() -> None:
    """One check in the config reader covers every float key, a method's and the newest ones included."""
    import dataclasses
    import typing

    from posttrain.algorithms import ALGORITHMS
    from posttrain.config import TrainConfig

    base = {"model": "m", "output_dir": "/tmp/never", "data": {"train": "d.jsonl"}}
    classes: list[tuple[str, type, str]] = [(m, c, "") for m, c in ALGORITHMS.items()]
    classes.append(("dpo", TrainConfig, ""))
    checked = 0
    for method, cls, prefix in classes:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if float not in (hint, *typing.get_args(hint)) or typing.get_origin(hint) is tuple:
                continue
            for bad in (INF, -INF, NAN):
                with pytest.raises(ConfigError, match=rf"^{prefix}{f.name}: must be a finite number, got "):
                    from_dict({**base, "method": method, f.name: bad})
            checked += 1
    assert checked > 20  # every method's float hyperparameters and the run's own


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"method: dpo\n  model: [x\n", "not valid YAML: mapping values are not allowed here (line 2)"),
        (b"- method\n- dpo\n", "config: expected a mapping at the top level, got list"),
        (b"method: dpo\nmodel: caf\xe9\n", "line 2: not UTF-8 text (byte 0xe9); save it as UTF-8"),
        (b"", "method: is required; one of dpo, "),
    ],
)
def test_unreadable_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: bytes, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(text)
    assert fails(capsys, "train", str(config)).startswith(f"{config}: {message}")
    assert fails(capsys, "train", str(tmp_path)) == f"{tmp_path}: a folder, not a config file"


def test_set_with_a_value_that_is_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path)
    message = fails(capsys, "train", str(config), "--set", "beta=[1")
    assert message.startswith(f"{config}: --set 'beta=[1': the value is not valid YAML: ")
    assert_nothing_written(tmp_path)


def test_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("keep")
    config = config_file(tmp_path, output_dir=str(afile))
    assert fails(capsys, "train", str(config)) == f"{config}: output_dir: {afile} is a file, not a folder"
    config = config_file(tmp_path, output_dir=str(afile / "run"))
    assert (
        fails(capsys, "train", str(config)) == f"{config}: output_dir: {afile / 'run'}: {afile} is a file, not a folder"
    )
    assert afile.read_text() == "keep"


def test_reference_cache_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "cache"
    afile.write_text("x")
    config = config_file(tmp_path, reference={"kind": "cached", "cache_dir": str(afile)})
    assert fails(capsys, "train", str(config)) == (
        f"{config}: reference.cache_dir: {afile}: {afile} is a file, not a folder"
    )


def test_home_folder_in_paths_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = from_dict(
        {"method": "dpo", "model": "~/m", "output_dir": "~/runs/x", "data": {"train": "~/d.jsonl", "eval": "~/e.jsonl"},
         "reference": {"model": "~/ref", "cache_dir": "~/cache"}}
    )  # fmt: skip
    home = tmp_path / "home"
    assert (config.model, config.output_dir) == (str(home / "m"), str(home / "runs/x"))
    assert (config.data.train, config.data.eval) == (str(home / "d.jsonl"), str(home / "e.jsonl"))
    assert (config.reference.model, config.reference.cache_dir) == (str(home / "ref"), str(home / "cache"))
    assert from_dict(config.to_dict()) == config


def test_train_into_home_folder_writes_there(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``output_dir: ~/x`` trains into $HOME/x, and the printed paths say so; no folder named ``~`` appears."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = config_file(tmp_path, model=tiny_model_dir, output_dir="~/x")
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "home/x/model/config.json").is_file()
    assert f"model:   {tmp_path / 'home/x/model'}" in out
    assert not (tmp_path / "~").exists()


# --------------------------------------------------------------------------------------------------- data

DATA_COMMANDS = [("train",), ("data", "validate"), ("recommend",)]


def run_on_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: tuple[str, ...], data: Path, model: Path
) -> str:
    if command == ("train",):  # read after the tokenizer, before the model
        config = config_file(tmp_path, model=model, data={"train": str(data)})
        message = fails(capsys, "train", str(config))
        assert_nothing_written(tmp_path)
        return message
    return fails(capsys, *command, str(data))


@pytest.mark.parametrize("command", DATA_COMMANDS)
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", BAD_UTF8, "row 2: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"),
        ("d.csv", b"prompt,chosen,rejected\nq,a,b\ncaf\xe9,a,b\n", "line 3: not UTF-8 text (byte 0xe9 at column 4)"),
        ("d.json", b'[{"prompt": "q",\n "chosen": "\xff"}]', "line 2: not UTF-8 text (byte 0xff at column 13)"),
        ("d.csv", b"\xef\xbb\xbfprompt,chosen,rejected\nq,a,\xfe\n", "line 2: not UTF-8 text (byte 0xfe at column 5)"),
        ("d.jsonl", b"", "no rows"),
        ("d.jsonl", b"\n  \n", "no rows"),
        ("d.json", b"[]", "no rows"),
        ("d.csv", b"prompt,chosen,rejected\n", "no rows"),
        ("d.jsonl", b'{"prompt": "q"\n', "row 1: not valid JSON"),
        ("d.jsonl", b"[1, 2]\n", "row 1: expected an object with named fields, got list"),
        ("d.json", b'{"rows": []}', "expected a JSON list of rows, got dict"),
        ("d.parquet", b"not parquet at all", "not a readable parquet file"),
        ("d.csv", b"prompt,chosen,rejected\nq,a,b,extra\n", "row 1: more cells than the header has columns"),
        ("d.txt", b"hello", "unknown data format '.txt'"),
    ],
)
def test_unreadable_data_files(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...], name: str,
    content: bytes, message: str,
) -> None:  # fmt: skip
    data = tmp_path / name
    data.write_bytes(content)
    assert run_on_data(capsys, tmp_path, command, data, tiny_model_dir).startswith(f"{data}: {message}")


@pytest.mark.parametrize("command", [("train",), ("data", "validate")])
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "chosen": "a b"}, "field 'rejected': missing"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a string or a list of messages"),
        ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, "field 'prompt[0]': expected a message {role, content}"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin': expected a number"),
        ({"prompt": "q", "chosen": "a b", "rejected": "a b \n "}, "field 'rejected': identical to 'chosen' but for"),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a  "}],
            },
            "field 'rejected': identical to 'chosen' but for trailing whitespace: no preference to learn",
        ),
    ],
)
def test_bad_rows_name_file_row_and_field(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...],
    row: dict[str, Any], message: str,
) -> None:  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", [*PAIRS, row])
    assert run_on_data(capsys, tmp_path, command, data, tiny_model_dir).startswith(f"{data}: row 5: {message}")


def test_chosen_equal_to_rejected_once_tokenized(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """Texts that differ only where the tokenizer does not look (here: NFC normalisation) are refused with
    the file and the row, not trained on as a pair with no preference."""
    import copy

    from posttrain.data.examples import PreferenceExample
    from posttrain.data.formats import DataError
    from posttrain.data.tokenize import Renderer, tokenize_preferences

    renderer = Renderer(copy.deepcopy(tiny_tokenizer), chat_template=False)
    same = PreferenceExample(prompt="q", chosen="caf\u00e9", rejected="cafe\u0301", row=7)  # NFC: the same text
    with pytest.raises(DataError, match=r"^d\.jsonl: row 7: field 'rejected': the same tokens as 'chosen'"):
        tokenize_preferences([same], renderer, 64, 32, "d.jsonl")


def test_distill_without_a_margin_names_the_row(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``distill`` regresses onto each pair's margin: a row without one is refused before anything is written."""
    data = write_jsonl(tmp_path / "d.jsonl", [{**p, "margin": 0.5} for p in PAIRS] + [PAIRS[0]])
    config = config_file(tmp_path, model=tiny_model_dir, method="distill", data={"train": str(data)})
    message = fails(capsys, "train", str(config))
    assert message.startswith(f"{data}: row 5: field 'margin': missing; distill regresses onto"), message
    assert_nothing_written(tmp_path)


def test_distill_margins_are_checked_by_data_validate_and_before_a_pipeline_starts(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same refusal from ``data validate --method distill`` (where dpo passes the file), and from a pipeline
    whose later distill stage reads the file an earlier dpo stage trains on: before the first stage runs."""
    data = write_jsonl(tmp_path / "d.jsonl", [{**p, "margin": 0.5} for p in PAIRS] + [PAIRS[0]])
    assert main(["data", "validate", str(data), "--method", "dpo"]) == 0
    capsys.readouterr()
    message = fails(capsys, "data", "validate", str(data), "--method", "distill")
    assert message.startswith(f"{data}: row 5: field 'margin': missing; distill regresses onto"), message
    stages = [{"name": "dpo", "method": "dpo", "max_steps": 1},
              {"name": "distill", "method": "distill", "max_steps": 1}]  # fmt: skip
    config = config_file(tmp_path, model=tiny_model_dir, data={"train": str(data)}, stages=stages)
    message = fails(capsys, "train", str(config))
    assert "distill" in message.split(":")[0], message  # the stage's label comes first
    assert message.endswith(f"{data}: row 5: field 'margin': missing; distill regresses onto each pair's reward "
                            "margin (chosen's score minus rejected's)"), message  # fmt: skip
    assert_nothing_written(tmp_path)
