"""The ``rewards`` entries of a config: what each one names, and whether it fits, checked when the config is
read (before any model loads).

An entry is a name or a mapping ``{name, weight, label, **options}``. ``name`` is a built-in
(:data:`BUILTIN_REWARDS`) or an import path, ``module:attr`` or ``module.attr``. The module is looked for,
in order, as a file or package in the config file's folder, in the current directory, then among the
installed packages: a ``my_rewards.py`` next to the config needs no PYTHONPATH. A class takes ``options``
as keyword arguments of its constructor (checked against its signature and annotations); a function takes
none. ``weight`` (default 1) is a finite number; ``label`` (default ``name``) is the name the reward is
logged under, unique in the run.

:func:`check_specs` turns each mistake into one :class:`~posttrain.config.ConfigError` naming the entry,
``rewards[i] (NAME): ...``; :func:`required_columns` says which data columns a loaded reward reads.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.fields import coerce, nearest

BUILTIN_REWARDS = {
    "numeric_answer": "posttrain.rewards.rules:NumericAnswer",
    "regex_format": "posttrain.rewards.rules:RegexFormat",
    "length_penalty": "posttrain.rewards.rules:LengthPenalty",
    "overlong": "posttrain.rewards.rules:SoftOverlongPunishment",
    "truncation_penalty": "posttrain.rewards.rules:TruncationPenalty",
    "reward_model": "posttrain.rewards.model:RewardModelScorer",
    "sentiment": "posttrain.rewards.sentiment:Sentiment",
}
MODEL_REWARDS = {"reward_model": BUILTIN_REWARDS["reward_model"]}
"""Built-ins that load a model (``path``): checked for the path only, built when the run starts."""
LOOP_COLUMNS = ("completion_lengths", "truncated")
"""Columns the online loop passes with every completion, whatever the data holds."""
ENTRY_KEYS = ("name", "weight", "label")


def split_entry(spec: Any) -> tuple[str, float, str | None, dict[str, Any]]:
    """``(name, weight, label, options)`` of one entry; ValueError when its shape, name or weight is wrong.

    The helpers here word their errors without the reward's name: the caller puts it first.

    >>> split_entry({"name": "numeric_answer", "weight": 2, "column": "solution"})
    ('numeric_answer', 2.0, None, {'column': 'solution'})
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"expected a reward name or a mapping {{name, weight, ...}}, got {spec!r}")
    options = dict(spec)
    name, weight, label = options.pop("name", None), options.pop("weight", 1.0), options.pop("label", None)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name: is required: one of {', '.join(sorted(BUILTIN_REWARDS))} or 'module:function'")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ValueError(f"label must be a non-empty string, got {label!r}")
    return name, float(weight), label, options


def resolve(name: str, folders: Sequence[Path] = ()) -> Any:
    """The class or function that reward ``name`` refers to; ValueError naming what does not resolve.

    ``folders``: where a module is looked for before the current directory (the config file's folder).
    """
    path = BUILTIN_REWARDS.get(name, name)
    module_name, sep, attrs = path.partition(":")
    if not sep:
        module_name, _, attrs = path.rpartition(".")
    if not module_name or not attrs:
        known = ", ".join(sorted(BUILTIN_REWARDS))
        raise ValueError(
            f"not a built-in reward nor an import path 'package.module:function'{nearest(name, BUILTIN_REWARDS)};"
            f" built-ins: {known}"
        )
    target = _import(module_name, [*folders, Path.cwd()])
    for attr in attrs.split("."):
        if not hasattr(target, attr):
            public = [a for a in dir(target) if not a.startswith("_")]
            raise ValueError(f"{module_name!r} has no attribute {attrs!r}{nearest(attr, public)}")
        target = getattr(target, attr)
    return target


def _import(module_name: str, folders: Sequence[Path]) -> Any:
    top = module_name.split(".")[0]
    home = None
    if top not in sys.modules:  # else already imported: that module it is
        home = next((f for f in folders if (f / f"{top}.py").is_file() or (f / top / "__init__.py").is_file()), None)
    added = home is not None and str(home) not in sys.path
    if added:
        sys.path.insert(0, str(home))
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        places = ", ".join(dict.fromkeys(str(f) for f in folders))
        raise ValueError(f"cannot import {module_name!r} ({err}); looked in {places} and installed packages") from None
    except Exception as err:  # the user's module itself failed while it was imported (a SyntaxError ...)
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"importing {module_name!r} failed: {type(err).__name__}: {first}") from None
    finally:
        if added:
            sys.path.remove(str(home))


def construct(target: Any, options: Mapping[str, Any]) -> Any:
    """The reward: ``target(**options)`` for a class, ``target`` itself for a function. A constructor that
    refuses its options (a ValueError, a bad regular expression ...) is a ValueError saying why."""
    if not inspect.isclass(target):
        return target
    try:
        return target(**options)
    except ConfigError:  # a reward model that cannot load says so itself, naming its key
        raise
    except re.error as err:
        raise ValueError(f"not a valid regular expression: {err}") from err
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err


def check_options(target: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of an entry checked against ``target``'s constructor: each one a parameter (else
    the nearest is named), every required one given, values of the annotated type (YAML's ``1e-3``, read as
    a string, becomes a float as in the rest of the config). Returns the options to construct with."""
    if not inspect.isclass(target):
        if not callable(target):
            raise ValueError(f"not callable (a {type(target).__name__})")
        if options:
            raise ValueError(f"not a class, so it takes no options; got {sorted(options)}")
        return {}
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (a C extension class): the constructor judges
        return dict(options)
    named = {p.name: p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for option in options:
            if option not in named:
                valid = [*named, *ENTRY_KEYS]
                raise ValueError(f"unknown option {option!r}{nearest(option, valid)}; it takes {', '.join(valid)}")
    missing = [p for p in named.values() if p.default is p.empty and p.name not in options]
    if missing:
        raise ValueError(f"missing a required argument: {missing[0].name!r}")
    hints = _hints(target)
    out = dict(options)
    for option, value in options.items():
        if option in hints:
            try:
                out[option] = coerce(value, hints[option], option)
            except TypeError:  # a type the config reader does not know: the constructor judges
                continue
            except ConfigError as err:
                raise ValueError(f"option {err}") from None
    return out


def _hints(cls: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except (NameError, TypeError, AttributeError, SyntaxError):  # unresolvable annotations: no type checks
        return {}


def check_specs(specs: Sequence[Any], folders: Sequence[Path] = (), models_to_come: Collection[str] = ()) -> None:
    """Every entry of ``rewards`` resolved and checked (the built-in rules built, to check their values;
    nothing that loads a model, nor a user's class); the first mistake is a ConfigError ``rewards[i] (NAME):
    ...``. ``folders``: where modules are looked for first (the config file's folder); ``models_to_come``:
    model folders that earlier pipeline stages will write (a ``reward_model`` may name one).
    """
    from posttrain.model.load import local_model_problem

    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        named = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, Mapping) else None
        key = f"rewards[{i}] ({named})" if isinstance(named, str) and named else f"rewards[{i}]"
        try:
            name, _, label, options = split_entry(spec)
            shown = label or name
            if shown in seen:
                raise ValueError(f"logged as {shown!r} like rewards[{seen[shown]}]: give one of them another 'label'")
            seen[shown] = i
            target = resolve(name, folders)
            options = check_options(target, options)
            if name in BUILTIN_REWARDS and name not in MODEL_REWARDS:  # cheap and ours: built, to check the values
                construct(target, options)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
        path = options.get("path")
        if BUILTIN_REWARDS.get(name) in MODEL_REWARDS.values() and isinstance(path, str):
            problem = None if path in models_to_come else local_model_problem(path)
            if problem:
                raise ConfigError(f"{key}: path: {problem}")


def required_columns(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The data columns reward ``fn`` reads: its ``required_columns`` when it declares them (the built-ins
    do), else the parameters of its call after ``prompts`` and ``completions`` that have no default.

    >>> def exact(prompts, completions, answer, **columns): ...
    >>> required_columns(exact)
    ('answer',)
    """
    declared = getattr(fn, "required_columns", None)
    if declared is not None:
        return tuple(declared)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    return tuple(
        p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    )
