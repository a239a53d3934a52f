"""Reading a run configuration: YAML -> flat mapping -> ``--set`` overrides -> :class:`TrainConfig`.

Shared by single runs (:func:`load`) and pipelines (:mod:`posttrain.pipeline` reads its file with
:func:`read_yaml` and merges stages with :func:`section` and :func:`apply_overrides`), so that a YAML error,
a ``reference: none`` shorthand or an override reads the same in both. The schema itself is
:mod:`posttrain.config.schema`.
"""

from __future__ import annotations

import codecs
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from posttrain.algorithms import ALGORITHMS, hyperparameter_owners
from posttrain.config.schema import TrainConfig
from posttrain.errors import ConfigError, check
from posttrain.fields import build, nearest


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from the flat YAML mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = dict(raw)
    method = raw.pop("method", None)
    check(method is not None, "method", f"is required; one of {', '.join(ALGORITHMS)}")
    check(isinstance(method, str), "method", f"expected a string, one of {', '.join(ALGORITHMS)}; got {method!r}")
    check(
        method in ALGORITHMS,
        "method",
        f"unknown method {method!r}{nearest(str(method), ALGORITHMS)}; one of {', '.join(ALGORITHMS)}",
    )
    algo_cls = ALGORITHMS[method]
    owners = hyperparameter_owners()
    own = {f.name for f in dataclasses.fields(algo_cls)}
    algo_raw = {}
    for key in list(raw):
        if key in own:
            algo_raw[key] = raw.pop(key)
        elif key in owners:
            raise ConfigError(f"{key}: not a parameter of method {method!r} (used by {', '.join(owners[key])})")
    top = {f.name for f in dataclasses.fields(TrainConfig)} - {"algorithm"}
    for key in raw:  # checked here so that the nearest name may be one of the method's hyperparameters
        if key not in top:
            raise ConfigError(f"{key}: unknown key{nearest(key, top | own)}")
    if "reference" in raw:
        raw["reference"] = section("reference", raw["reference"])
    algorithm = build(algo_cls, algo_raw)
    return typing.cast(TrainConfig, build(TrainConfig, raw, algorithm=algorithm))


def section(key: str, value: Any) -> Any:
    """``value`` of top-level ``key`` as a section: ``reference: none`` is shorthand for ``{kind: none}``
    (read, overridden with ``--set reference.kind=...`` and merged in a pipeline alike)."""
    return {"kind": value} if key == "reference" and isinstance(value, str) else value


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.max_length=256"`` -> (["data", "max_length"], 256); the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (dotted keys for nested sections)")
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {str(err).splitlines()[0]}") from None


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    out = dict(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = section(part, node.get(part))
            node[part] = dict(child) if isinstance(child, dict) else ({} if child is None else child)
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return out


def load(source: str | Path | dict[str, Any] | TrainConfig, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """A config from a YAML path, a dict or a config object, with ``--set`` style overrides applied."""
    if isinstance(source, TrainConfig):
        if not overrides:
            return source
        source = source.to_dict()
    if isinstance(source, (str, Path)):
        path = Path(source)
        raw = read_yaml(path)
        try:
            config = from_dict(apply_overrides({} if raw is None else raw, overrides))
            check_rewards(config.rewards, (path.parent,))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        return config
    config = from_dict(apply_overrides(source, overrides))
    check_rewards(config.rewards)
    return config


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a missing file, bytes that are not UTF-8 or bad YAML: one ConfigError
    naming the file (and the line)."""
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a BOM, as Windows editors write
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        byte = data[err.start]
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{byte:02x}); save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}{at}") from err


def read_raw(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The top-level mapping of a YAML path or a dict (errors as :func:`load` words them; pipelines read
    their file with it)."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def check_models(config: TrainConfig) -> None:
    """The model paths of a config that can be judged without loading them (a file, a folder without
    config.json, a missing folder that cannot be a hub id either; :func:`posttrain.model.load.local_model_problem`):
    checked when a run starts, before anything loads (not when a config is read: a pipeline's later stages start
    from models that earlier stages write)."""
    from posttrain.model.load import local_model_problem  # (lazily: reading a config loads no model code)

    critic = getattr(config.algorithm, "critic_model", None)
    for key, name in (("model", config.model), ("reference.model", config.reference.model), ("critic_model", critic)):
        problem = local_model_problem(name) if isinstance(name, str) else None
        if problem:
            raise ConfigError(f"{key}: {problem}")


def check_rewards(
    rewards: typing.Sequence[Any], folders: typing.Sequence[Path] = (), models_to_come: typing.Collection[str] = ()
) -> None:
    """Each reward entry resolved and checked against its signature (:func:`posttrain.rewards.specs.check_specs`),
    nothing built: ``folders`` are where a ``module:function`` is looked for before the current directory."""
    if rewards:
        from posttrain.rewards.specs import check_specs  # (lazily: only configs with rewards need it)

        check_specs(rewards, folders, models_to_come)
