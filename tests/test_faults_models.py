"""Bad models, tried as a new user would: a path that is no model, a folder without a tokenizer, weights
that cannot be read or do not fit, adapters on modules the model lacks, a model that needs its own code
(refused unless ``trust_remote_code: true``, never a prompt). Each one line naming the key, exit status 2,
no model or checkpoint written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_faults_input import BAD_UTF8, PAIRS, assert_nothing_written, config_file, fails, write_jsonl

from posttrain.config import ConfigError, load
from posttrain.model import load as model_load


def tiny_copy(tmp_path: Path, tiny_model_dir: Path, name: str, skip: tuple[str, ...] = ()) -> Path:
    import shutil

    folder = tmp_path / name
    shutil.copytree(tiny_model_dir, folder, ignore=lambda _, names: [n for n in names if n in skip])
    return folder


def test_model_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found when the run starts, before anything loads, for each key that names a model."""
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    for name in (str(tmp_path / "no-model"), "./models/none", "a/b/c"):
        config = config_file(tmp_path, model=name)
        expected = f"model: {name}: no such folder (and not a hub id, NAME or ORG/NAME)"
        assert fails(capsys, "train", str(config)) == expected
    config = config_file(tmp_path, model=str(data))
    assert fails(capsys, "train", str(config)) == f"model: {data} is a file, not a model folder"
    config = config_file(tmp_path, model="hub-org/model", reference={"model": str(tmp_path)})
    assert (
        fails(capsys, "train", str(config)) == f"reference.model: {tmp_path} holds no config.json (not a saved model)"
    )
    config = config_file(tmp_path, method="ppo", model="hub-org/model", critic_model="../critic")
    assert fails(capsys, "train", str(config)) == (
        "critic_model: ../critic: no such folder (and not a hub id, NAME or ORG/NAME)"
    )
    config = config_file(tmp_path, model="embedded:nope")
    assert fails(capsys, "train", str(config)).startswith("model: unknown embedded model 'nope'; known: ")
    assert_nothing_written(tmp_path)


def test_weights_of_other_shapes_than_the_config(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_copy(tmp_path, tiny_model_dir, "resized")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    message = fails(capsys, "train", str(config_file(tmp_path, model=model)))
    assert message == f"model: {model}: its weights do not have the shapes its config.json gives"
    assert not (tmp_path / "run" / "model").exists()


def test_lora_target_modules_the_model_lacks(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("peft")
    config = config_file(tmp_path, model=tiny_model_dir, lora={"target_modules": "nonexistent_proj"})
    message = fails(capsys, "train", str(config))
    assert message.startswith("lora.target_modules: Target modules {'nonexistent_proj'} not found in the base model")
    assert not (tmp_path / "run" / "model").exists()


def test_eval_with_bad_arguments(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, model=tiny_model_dir)
    assert fails(capsys, "eval", str(config), "--model", str(tmp_path / "nothing")) == (
        f"--model: {tmp_path / 'nothing'}: no such folder (and not a hub id, NAME or ORG/NAME)"
    )
    assert fails(capsys, "eval", str(config)) == "data.eval: the config has no eval data; pass --data FILE"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_UTF8)
    assert fails(capsys, "eval", str(config), "--data", str(bad)).startswith(f"{bad}: row 2: not UTF-8 text")


def test_model_folder_without_a_tokenizer(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_copy(tmp_path, tiny_model_dir, "no-tokenizer", skip=("tokenizer.json", "tokenizer_config.json"))
    config = config_file(tmp_path, model=model)
    assert fails(capsys, "train", str(config)).startswith(f"model: {model} has no tokenizer (none of tokenizer.json")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_model_weights(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    model = tiny_copy(tmp_path, tiny_model_dir, "corrupt")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    config = config_file(tmp_path, model=model)
    message = fails(capsys, "train", str(config))
    assert message.startswith(f"model: {model}: a weights file cannot be read (truncated or corrupt?): ")
    out = tmp_path / "run"  # nothing of a run: no model, no checkpoint, no metrics
    assert not any((out / name).exists() for name in ("model", "checkpoints", "metrics.jsonl", "config.yaml"))


def custom_code_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model folder whose config names code of its own (``auto_map``, a ``model_type`` transformers does
    not know); the code, if ever run, writes a file to say so."""
    model = tiny_copy(tmp_path, tiny_model_dir, "custom")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mystery", architectures=["MysteryForCausalLM"])
    config["auto_map"] = {"AutoConfig": "modeling_mystery.MysteryConfig",
                          "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_mystery.py").write_text(
        f"open({str(tmp_path / 'RAN')!r}, 'w').write('the custom code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class MysteryConfig(LlamaConfig):\n    model_type = 'mystery'\n"
        "class MysteryForCausalLM(LlamaForCausalLM):\n    config_class = MysteryConfig\n"
    )
    return model


def test_custom_code_is_refused_without_a_prompt(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = custom_code_model(tmp_path, tiny_model_dir)
    config = config_file(tmp_path, model=model)
    assert fails(capsys, "train", str(config)) == (
        f"model: {model} needs its own Python code (config.json has auto_map and a model_type transformers does not "
        "know); set trust_remote_code: true to run it, if you trust that code"
    )
    assert not (tmp_path / "RAN").exists()
    for loader in (model_load.load_tokenizer, model_load.load_causal_lm):  # each load refuses it on its own
        with pytest.raises(ConfigError, match="set trust_remote_code: true"):
            loader(str(model))
    scorer_spec = {"name": "reward_model", "path": str(model)}
    from posttrain.rewards.combine import load_reward

    with pytest.raises(ValueError, match="set trust_remote_code: true"):
        load_reward(scorer_spec)
    assert not (tmp_path / "RAN").exists()


def test_a_tokenizer_of_its_own_is_refused_too(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A known model type whose tokenizer is custom code: transformers refuses it (trust_remote_code=False is
    passed, never left unset), and posttrain words that as one line naming the key."""
    model = tiny_copy(tmp_path, tiny_model_dir, "custom-tokenizer")
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="MysteryTokenizer", auto_map={"AutoTokenizer": ["tok.MysteryTokenizer", None]})
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    (model / "tok.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    config = config_file(tmp_path, model=model)
    expected = f"model: {model} needs its own Python code; set trust_remote_code: true to run it"
    assert fails(capsys, "train", str(config)) == expected
    assert not (tmp_path / "RAN").exists()


def test_trust_remote_code_reaches_every_load(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``from_pretrained`` posttrain makes passes the run's ``trust_remote_code`` (false by default):
    policy, reference, reward model and critic load through :func:`posttrain.model.load.pretrained`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    seen: list[tuple[str, object]] = []
    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer):
        real = auto.from_pretrained

        def spy(*args: Any, _real: Any = real, _name: str = auto.__name__, **kwargs: Any) -> Any:
            seen.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    tokenizer = model_load.load_tokenizer(str(tiny_model_dir))
    model_load.load_causal_lm(str(tiny_model_dir))
    with model_load.remote_code(True):
        model_load.load_tokenizer(str(tiny_model_dir))
        model_load.load_reward_model(str(tiny_model_dir), tokenizer)
    assert seen == [
        ("AutoTokenizer", False),
        ("AutoModelForCausalLM", False),
        ("AutoTokenizer", True),
        ("AutoModelForSequenceClassification", True),
    ]
    assert not model_load.trusted()  # back to false outside


def test_trust_remote_code_is_read_from_the_config(tmp_path: Path) -> None:
    config = config_file(tmp_path, model="hub-org/model", trust_remote_code=True)
    assert load(config).trust_remote_code is True
    assert load(config_file(tmp_path, model="hub-org/model")).trust_remote_code is False
