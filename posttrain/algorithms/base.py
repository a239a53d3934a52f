"""The base of every algorithm class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Algorithm:
    """A method: its name, what it needs from the loops, and (in subclasses) its hyperparameters."""

    name: ClassVar[str]
    data_kind: ClassVar[str]
    """Which records the method trains on: ``preference`` (prompt, chosen, rejected)."""
    needs_reference: ClassVar[bool]
    """Whether the loss uses reference log-probs (a frozen model or the on-disk cache)."""
    default_learning_rate: ClassVar[float] = 5e-7

    @classmethod
    def check_examples(cls, examples: Sequence[Any], source: str) -> None:
        """Refuse rows that parse as ``data_kind`` but lack what this method reads (DataError naming the row).

        Called wherever rows are read for the method, so ``posttrain data validate --method``, a pipeline's
        check before its first stage, and the run itself refuse the same row with the same line."""

    def uses_reference(self, kind: str) -> bool:
        """Whether a run with ``reference.kind: kind`` scores a reference (the config's ``uses_reference``)."""
        return self.needs_reference and kind != "none"

    def reference_refusal(self, kind: str) -> str | None:
        """Why ``reference.kind: kind`` is an error for this method (a key that would do nothing), or None."""
        if self.needs_reference and kind == "none":
            return f"method {self.name!r} needs a reference: copy or cached, got none"
        return None
