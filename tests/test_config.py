"""Config: YAML/dict/object loading, ``--set`` overrides, errors that name the field, method defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.algorithms import ALGORITHMS
from posttrain.config import ConfigError, DataConfig, ReferenceConfig, load, parse_override

BASE: dict[str, Any] = {
    "method": "dpo",
    "model": "tiny-model",
    "output_dir": "runs/out",
    "data": {"train": "prefs.jsonl", "max_length": 512, "max_prompt_length": 256},
}


def raw(**changes: Any) -> dict[str, Any]:
    """BASE with top-level keys changed (a value of ``...`` removes the key)."""
    out = {**BASE, "data": dict(BASE["data"])}
    for key, value in changes.items():
        if value is ...:
            out.pop(key)
        else:
            out[key] = value
    return out


def error(source: Any, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load(source, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------- loading


def test_load_from_yaml_path_dict_and_object_agree(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw(beta=0.25, batch_size=4)))
    from_path = load(path)
    assert load(str(path)) == from_path
    assert load(raw(beta=0.25, batch_size=4)) == from_path
    assert load(from_path) is from_path  # no overrides: the same frozen object
    assert from_path.method == "dpo"
    assert from_path.algorithm.beta == 0.25  # type: ignore[attr-defined]
    assert from_path.batch_size == 4
    assert from_path.data == DataConfig(train="prefs.jsonl", max_length=512, max_prompt_length=256)
    assert from_path.reference == ReferenceConfig()


def test_load_does_not_mutate_the_given_dict() -> None:
    given = raw(reference={"kind": "copy"})
    before = yaml.safe_dump(given)
    load(given, ["data.max_length=300", "reference.kind=cached", "beta=0.3"])
    assert yaml.safe_dump(given) == before


def test_config_is_frozen() -> None:
    config = load(raw())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 2  # type: ignore[misc]


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    """PyYAML reads ``5e-7`` (no dot) as a string; a learning rate written that way must still load."""
    path = tmp_path / "run.yaml"
    path.write_text("method: dpo\nmodel: m\noutput_dir: o\ndata: {train: t.jsonl}\nlearning_rate: 5e-7\nbeta: 1E-1\n")
    config = load(path)
    assert config.learning_rate == 5e-7
    assert config.algorithm.beta == 0.1  # type: ignore[attr-defined]
    assert load(raw(), ["learning_rate=2e-6"]).lr == 2e-6
    assert "learning_rate: expected a number, got 'fast'" in error(raw(learning_rate="fast"))


def test_missing_file_and_invalid_yaml_name_the_file(tmp_path: Path) -> None:
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dpo\nmodel: [unclosed\n")
    assert error(bad).startswith(f"{bad}: not valid YAML: ")


def test_errors_from_a_file_are_prefixed_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw(beta=0)))
    assert error(path) == f"{path}: beta: must be > 0, got 0.0"


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert error(path) == f"{path}: config: expected a mapping at the top level, got list"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert error(empty).startswith(f"{empty}: method: is required; one of dpo, ")


# --------------------------------------------------------------------------------------------- overrides


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("data.max_length=256") == (["data", "max_length"], 256)
    assert parse_override("beta=0.5") == (["beta"], 0.5)
    assert parse_override("max_grad_norm=null") == (["max_grad_norm"], None)
    assert parse_override("data.chat_template=false") == (["data", "chat_template"], False)
    assert parse_override("adam_betas=[0.8, 0.9]") == (["adam_betas"], [0.8, 0.9])
    assert parse_override("model=a=b") == (["model"], "a=b")  # only the first '=' splits
    for bad in ("beta", "=3"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_override(bad)


def test_overrides_set_nested_and_top_level_keys() -> None:
    config = load(
        raw(), ["data.max_length=300", "data.max_prompt_length=100", "beta=0.5", "max_grad_norm=null", "seed=7"]
    )
    assert (config.data.max_length, config.data.max_prompt_length) == (300, 100)
    assert config.data.train == "prefs.jsonl"  # untouched sibling keys stay
    assert config.algorithm.beta == 0.5  # type: ignore[attr-defined]
    assert config.max_grad_norm is None
    assert config.seed == 7


def test_override_creates_a_missing_section() -> None:
    config = load(raw(), ["reference.kind=cached", "reference.cache_dir=/tmp/c"])
    assert config.reference == ReferenceConfig(kind="cached", cache_dir="/tmp/c")


def test_reference_none_shorthand() -> None:
    simpo = raw(method="simpo")
    assert load({**simpo, "reference": "none"}).reference.kind == "none"
    config = load(simpo, ["reference=none"])
    assert config.reference == ReferenceConfig(kind="none")
    assert not config.uses_reference
    # A dotted override on top of the shorthand turns it back into a section.
    assert load({**raw(), "reference": "none"}, ["reference.kind=cached"]).reference.kind == "cached"


def test_overrides_apply_to_a_config_object() -> None:
    config = load(raw())
    changed = load(config, ["batch_size=4", "data.max_prompt_length=128"])
    assert changed.batch_size == 4 and changed.data.max_prompt_length == 128
    assert config.batch_size == 8  # the original is untouched
    assert changed == dataclasses.replace(
        config, batch_size=4, data=dataclasses.replace(config.data, max_prompt_length=128)
    )


def test_override_into_a_non_section_is_an_error() -> None:
    message = error(raw(), ["model.name=x"])
    assert message == "--set 'model.name=x': model is not a section"


def test_override_errors_are_validated_like_the_file() -> None:
    assert error(raw(), ["beta=-1"]) == "beta: must be > 0, got -1.0"
    assert error(raw(), ["data.max_lenght=3"]) == "data.max_lenght: unknown key (did you mean 'max_length'?)"


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("method", ["dpo", "ipo", "cdpo", "robust_dpo", "hinge", "simpo"])
@pytest.mark.parametrize("beta", [0, -0.5])
def test_beta_must_be_positive(method: str, beta: float) -> None:
    assert error(raw(method=method, beta=beta)) == f"beta: must be > 0, got {float(beta)}"


def test_unknown_method_suggests_the_nearest() -> None:
    # ("dpp" is now one edit from both dpo and ppo; "dpoo" has one nearest name)
    message = error(raw(method="dpoo"))
    assert message.startswith("method: unknown method 'dpoo' (did you mean 'dpo'?); one of ")
    assert all(name in message for name in ALGORITHMS)
    assert "did you mean" not in error(raw(method="zzzzzz"))


def test_missing_method() -> None:
    assert error(raw(method=...)) == f"method: is required; one of {', '.join(ALGORITHMS)}"


def test_unknown_key_suggests_the_nearest() -> None:
    assert error(raw(learning_rat=1e-6)) == "learning_rat: unknown key (did you mean 'learning_rate'?)"
    # The nearest name may be one of the method's own hyperparameters.
    assert error(raw(bta=0.2)) == "bta: unknown key (did you mean 'beta'?)"
    assert error(raw(method="simpo", gama=0.5)) == "gama: unknown key (did you mean 'gamma'?)"
    assert error(raw(totally_unrelated=1)) == "totally_unrelated: unknown key"
    assert error(raw(reference={"knd": "copy"})) == "reference.knd: unknown key (did you mean 'kind'?)"


def test_hyperparameter_of_another_method_names_its_owner() -> None:
    assert error(raw(gamma=0.5)) == "gamma: not a parameter of method 'dpo' (used by simpo, ppo)"
    assert (
        error(raw(label_smoothing=0.1)) == "label_smoothing: not a parameter of method 'dpo' (used by cdpo, robust_dpo)"
    )
    assert error(raw(method="orpo", beta=0.1)).startswith("beta: not a parameter of method 'orpo' (used by dpo, ")
    assert (
        error(raw(method="simpo", orpo_lambda=0.1)) == "orpo_lambda: not a parameter of method 'simpo' (used by orpo)"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model": ...}, "model: is required"),
        ({"output_dir": ...}, "output_dir: is required"),
        ({"data": ...}, "data: is required"),
        ({"data": {"max_length": 64}}, "data.train: is required"),
        ({"model": ""}, "model: is required (a local directory, a hub id or embedded:NAME)"),
        ({"data": {"train": ""}}, "data.train: is required (a file, a saved dataset dir or a hub name)"),
    ],
)
def test_missing_required_keys(changes: dict[str, Any], expected: str) -> None:
    assert error(raw(**changes)) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"batch_size": "8"}, "batch_size: expected an integer, got '8'"),
        ({"batch_size": 8.0}, "batch_size: expected an integer, got 8.0"),
        ({"batch_size": True}, "batch_size: expected an integer, got True"),
        ({"beta": "high"}, "beta: expected a number, got 'high'"),
        ({"beta": True}, "beta: expected a number, got True"),
        ({"model": 5}, "model: expected a string, got 5"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing: expected true or false, got 'yes'"),
        ({"micro_batch_size": "x"}, "micro_batch_size: expected an integer, got 'x'"),
        ({"max_grad_norm": "x"}, "max_grad_norm: expected a number, got 'x'"),
        ({"adam_betas": [0.9]}, "adam_betas: expected 2 values"),
        ({"adam_betas": 0.9}, "adam_betas: expected 2 values"),
        ({"adam_betas": [0.9, "b"]}, "adam_betas[1]: expected a number, got 'b'"),
        ({"data": "prefs.jsonl"}, "data: expected a mapping, got 'prefs.jsonl'"),
        (
            {"data": {"train": "t.jsonl", "chat_template": "yes"}},
            "data.chat_template: expected true or false, got 'yes'",
        ),
        ({"data": {"train": "t.jsonl", "max_length": "long"}}, "data.max_length: expected an integer, got 'long'"),
        ({"reference": {"kind": "frozen"}}, "reference.kind: must be one of copy, cached, none; got 'frozen'"),
        ({"reference": 3}, "reference: expected a mapping, got 3"),
        ({"lr_scheduler": "step"}, "lr_scheduler: must be one of cosine, linear, constant; got 'step'"),
        ({"precision": "fp16"}, "precision: must be one of fp32, bf16; got 'fp16'"),
    ],
)
def test_wrong_types(changes: dict[str, Any], expected: str) -> None:
    assert error(raw(**changes)) == expected


def test_ints_are_accepted_for_floats() -> None:
    config = load(raw(beta=1, epochs=2, max_grad_norm=3))
    assert config.algorithm.beta == 1.0  # type: ignore[attr-defined]
    assert isinstance(config.algorithm.beta, float)  # type: ignore[attr-defined]
    assert isinstance(config.epochs, float) and isinstance(config.max_grad_norm, float)
    assert load(raw(adam_betas=[0.8, 0.95])).adam_betas == (0.8, 0.95)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"method": "robust_dpo", "label_smoothing": 0.5}, "label_smoothing: must be in [0, 0.5), got 0.5"),
        ({"method": "robust_dpo", "label_smoothing": -0.1}, "label_smoothing: must be in [0, 0.5), got -0.1"),
        ({"method": "cdpo", "label_smoothing": 0.6}, "label_smoothing: must be in [0, 0.5], got 0.6"),
        ({"method": "simpo", "gamma": -1}, "gamma: must be >= 0, got -1.0"),
        ({"method": "orpo", "orpo_lambda": -0.1}, "orpo_lambda: must be >= 0, got -0.1"),
        (
            {"method": "iterative_dpo", "data": {"train": "p.jsonl"}, "num_generations": 5, "pairs_per_prompt": 3},
            "pairs_per_prompt: must be between 1 and num_generations // 2 = 2, got 3",
        ),
        ({"rpo_alpha": -1}, "rpo_alpha: must be >= 0, got -1.0"),
        (
            {"method": "iterative_dpo", "data": {"train": "p.jsonl"}, "loss": "ipo", "rpo_alpha": 1},
            "rpo_alpha: the NLL term belongs to the dpo loss (RPO): needs loss: dpo, got loss: ipo",
        ),
        (
            {"method": "iterative_dpo", "data": {"train": "p.jsonl"}, "rpo_alpha": -0.5},
            "rpo_alpha: must be >= 0, got -0.5",
        ),
        ({"batch_size": 8, "micro_batch_size": 3}, "micro_batch_size: must divide batch_size=8, got 3"),
        ({"micro_batch_size": 0}, "micro_batch_size: must divide batch_size=8, got 0"),
        ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
        ({"max_steps": 0}, "max_steps: must be >= 1, got 0"),
        ({"epochs": 0}, "epochs: must be > 0, got 0.0"),
        ({"learning_rate": 0}, "learning_rate: must be > 0, got 0.0"),
        ({"warmup_ratio": 1}, "warmup_ratio: must be in [0, 1), got 1.0"),
        ({"weight_decay": -0.1}, "weight_decay: must be >= 0, got -0.1"),
        ({"adam_betas": [0.9, 1.0]}, "adam_betas: each in [0, 1), got (0.9, 1.0)"),
        ({"adam_eps": 0}, "adam_eps: must be > 0, got 0.0"),
        ({"max_grad_norm": 0}, "max_grad_norm: must be > 0 or null, got 0.0"),
        ({"logps_chunk_size": 0}, "logps_chunk_size: must be >= 1, got 0"),
        ({"eval_steps": 0}, "eval_steps: must be >= 1 or null, got 0"),
        ({"save_steps": 0}, "save_steps: must be >= 1 or null, got 0"),
        ({"logging_steps": 0}, "logging_steps: must be >= 1, got 0"),
        ({"reference": "none"}, "reference.kind: method 'dpo' needs a reference: copy or cached, got none"),
        (
            {"data": {"train": "t.jsonl", "max_length": 256, "max_prompt_length": 256}},
            "data.max_prompt_length: must be in [1, data.max_length - 1 = 255], got 256",
        ),
        (
            {"data": {"train": "t.jsonl", "max_length": 256, "max_prompt_length": 300}},
            "data.max_prompt_length: must be in [1, data.max_length - 1 = 255], got 300",
        ),
        ({"data": {"train": "t.jsonl", "max_prompt_length": 0}}, "data.max_prompt_length: must be in [1, "),
        ({"data": {"train": "t.jsonl", "max_length": 1}}, "data.max_length: must be >= 2, got 1"),
        ({"data": {"train": "t.jsonl", "eval_size": -1}}, "data.eval_size: must be >= 0, got -1"),
        (
            {"data": {"train": "t.jsonl", "eval": "e.jsonl", "eval_size": 10}},
            "data.eval_size: must be 0 when data.eval is given (it would be ignored), got 10",
        ),
    ],
)
def test_out_of_range_values_name_the_field_and_range(changes: dict[str, Any], expected: str) -> None:
    assert error(raw(**changes)).startswith(expected)


def test_boundary_values_are_accepted() -> None:
    assert load(raw(method="robust_dpo", label_smoothing=0.49)).algorithm.label_smoothing == 0.49  # type: ignore[attr-defined]
    assert load(raw(method="cdpo", label_smoothing=0.5)).algorithm.label_smoothing == 0.5  # type: ignore[attr-defined]
    config = load(
        raw(
            batch_size=8,
            micro_batch_size=8,
            warmup_ratio=0,
            data={"train": "t", "max_length": 2, "max_prompt_length": 1},
        )
    )
    assert (config.micro_batch_size, config.warmup_ratio) == (8, 0.0)
    assert (config.data.max_length, config.data.max_prompt_length) == (2, 1)
    assert load(raw(max_grad_norm=None)).max_grad_norm is None


def test_errors_are_raised_at_construction_too() -> None:
    with pytest.raises(ConfigError, match=re.escape("data.max_prompt_length: must be in [1, ")):
        DataConfig(train="t", max_length=10, max_prompt_length=10)
    with pytest.raises(ConfigError, match=r"^beta: must be > 0, got 0$"):
        ALGORITHMS["dpo"](beta=0)  # type: ignore[call-arg]


def test_keep_resumable_without_save_steps_is_read() -> None:
    """It does nothing then, but run folders were written with it (a frontier's rounds-as-points runs before
    the grid stopped giving it to them): refusing it would make their config.yaml unreadable."""
    assert load(raw(keep_resumable=1)).keep_resumable == 1


# ---------------------------------------------------------------------------------------------- defaults


def test_method_defaults_follow_the_papers() -> None:
    dpo = load(raw())
    assert dpo.algorithm == ALGORITHMS["dpo"]()
    assert (dpo.algorithm.beta, dpo.algorithm.rpo_alpha) == (0.1, 0.0)  # type: ignore[attr-defined]
    assert dpo.learning_rate is None and dpo.lr == 5e-7
    simpo = load(raw(method="simpo"))
    assert (simpo.algorithm.beta, simpo.algorithm.gamma) == (2.0, 1.0)  # type: ignore[attr-defined]
    assert simpo.lr == 1e-6
    orpo = load(raw(method="orpo"))
    assert orpo.algorithm.orpo_lambda == 0.1  # type: ignore[attr-defined]
    assert orpo.lr == 8e-6
    assert load(raw(method="orpo", learning_rate=1e-5)).lr == 1e-5  # the configured one wins
    assert load(raw(method="robust_dpo")).algorithm.label_smoothing == 0.1  # type: ignore[attr-defined]


def test_uses_reference() -> None:
    assert load(raw()).uses_reference
    assert load(raw(reference={"kind": "cached"})).uses_reference
    assert not load(raw(method="simpo")).uses_reference  # SimPO ignores the default 'copy'
    assert not load(raw(method="orpo")).uses_reference


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "dapo", "rloo", "ppo"])
def test_online_reference_keys_that_would_do_nothing_are_refused(method: str) -> None:
    """The reference of GRPO, RLOO and PPO scores the run's own samples when beta > 0: ``cached`` (computed
    before the run, from samples that do not exist yet) and ``none`` with a KL term are refused in one line;
    ``none`` with beta 0 and the default ``copy`` are accepted, and beta alone says whether one is loaded."""
    online = raw(method=method, data={"train": "prompts.jsonl"})
    assert error({**online, "beta": 0.1, "reference": {"kind": "cached"}}) == (
        f"reference.kind: cached is for offline data; {method} scores the reference on its own samples, which "
        "do not exist before the run (use copy)"
    )
    assert error({**online, "beta": 0.0, "reference": "none"}, ("reference.kind=cached",)).startswith(
        "reference.kind: cached is for offline data"
    )
    assert error({**online, "beta": 0.1}, ("reference=none",)) == (
        "reference.kind: none, but beta is 0.1: the KL term needs a reference (use copy, or set beta: 0)"
    )
    assert load({**online, "beta": 0.1}).uses_reference
    assert not load({**online, "beta": 0.0}).uses_reference
    assert not load({**online, "beta": 0.0, "reference": "none"}).uses_reference


def test_iterative_dpo_keeps_cached_for_its_rounds() -> None:
    online = raw(method="iterative_dpo", data={"train": "prompts.jsonl"})
    assert load({**online, "reference": {"kind": "cached"}}).reference.kind == "cached"


def test_data_defaults() -> None:
    data = load(raw(data={"train": "t.jsonl"})).data
    assert data == DataConfig(train="t.jsonl")
    assert (data.max_length, data.max_prompt_length, data.split, data.chat_template) == (1024, None, "train", None)
    assert data.prompt_limit == 512 and DataConfig(train="t", max_length=256).prompt_limit == 128


# ------------------------------------------------------------------------------------------- round trips
