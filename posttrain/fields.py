"""Typed fields read from YAML: a value checked against a dataclass field's type hint, and a dataclass built
from a mapping with every key checked (an unknown one gets the nearest valid name).

The config's sections and the rewards' options are read through these; the errors name the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

from posttrain.errors import ConfigError, check

EXPAND_USER = "a path: a leading ~ is the home folder"
PathStr = Annotated[str, EXPAND_USER]
"""A string naming a file or folder (a model, data, an output folder): read from YAML with ``~`` expanded,
as a shell would have (``output_dir: ~/runs/x`` is in the home folder, not in a folder named ``~``)."""


# PyYAML (YAML 1.1) reads a number with an exponent but no dot, such as 5e-7, as a string.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def nearest(name: object, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a field's type hint; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: expected {describe(hint)}, got {value!r}")
    if origin is Literal:
        check(value in args, name, f"must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if hint is Any:
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        check(isinstance(value, (list, tuple)), name, f"expected a list, got {value!r}")
        return tuple(coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        check(isinstance(value, (list, tuple)) and len(value) == len(args), name, f"expected {len(args)} values")
        return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        check(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if origin is Annotated:  # a str marked as a path: ~ expanded
        value = coerce(value, args[0], name)
        return os.path.expanduser(value) if EXPAND_USER in args[1:] and isinstance(value, str) else value
    if hint is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, name, f"expected a number, got {value!r}")
        # Every float key at once, the newest included: .inf / -.inf / .nan (or 1e999) are never a setting.
        check(math.isfinite(value), name, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        check(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        check(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
        return build(hint, value, prefix=f"{name}.")  # type: ignore[arg-type]
    raise TypeError(f"unsupported config type {hint!r} for {name}")


def describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) + " or null"


def build(cls: type, raw: dict[str, Any], prefix: str = "", **given: Any) -> Any:
    """Construct dataclass ``cls`` from ``raw``, checking every key; ``given`` fields are passed as is."""
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: the PathStr marker
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in given}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key{nearest(key, fields)}")
    kwargs = dict(given)
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = coerce(raw[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: is required")
    return cls(**kwargs)
