"""The config's error and its one-line check: a leaf that imports nothing of the package.

Every module that refuses a setting raises :class:`ConfigError` (``posttrain.config`` re-exports both names,
which stay its public contract), so importing it never pulls in the config schema or the algorithm registry.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


def check(condition: bool, name: str, message: str) -> None:
    """Raise ``ConfigError("name: message")`` unless ``condition``; used by every ``__post_init__``.

    >>> check(2 > 1, "beta", "must be > 0")
    >>> check(False, "beta", "must be > 0, got -1")
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: beta: must be > 0, got -1
    """
    if not condition:
        raise ConfigError(f"{name}: {message}")
