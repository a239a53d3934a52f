"""Read data files users already have, and validate every row before anything trains.

Readers: ``.jsonl``, ``.json`` (a list of objects), ``.parquet``, ``.csv``, a directory saved with
``datasets.save_to_disk``, or, when the path does not exist, a hub data set name (``datasets.load_dataset``).
Rows are numbered from 1 in file order (for JSONL that is the line number).

Preference rows come in three shapes, all turned into :class:`PreferenceExample`:

* standard: ``prompt``, ``chosen``, ``rejected`` strings;
* conversational: ``prompt`` a list of ``{role, content}`` messages, ``chosen`` and ``rejected`` lists of
  messages ending with the assistant;
* implicit prompt: no ``prompt``; ``chosen`` and ``rejected`` are whole texts or conversations sharing a
  prefix. The prompt is that prefix, cut at a message boundary (conversations) or before the whitespace
  that precedes the first differing word (texts), so no token is split between prompt and completion.

An optional ``margin`` column (a number; CSV cells holding one are read as numbers, an empty cell or a null
is no margin) is kept on each example: reward models use it as the Llama 2 margin, other methods ignore it.
Other columns are dropped.

Any bad row raises :class:`DataError` with one line naming the file, the row and the field.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from posttrain.data.examples import Conversation, PreferenceExample

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A data row is malformed; the message is one line: ``FILE: row N: field 'F': what is wrong``."""


BUNDLED = "bundled:"


def resolve_source(source: str) -> str:
    """``bundled:NAME`` names a data file shipped inside the package (see posttrain/bundled/README.md); a
    leading ``~`` is the home folder. Other relative paths are relative to the current directory."""
    if source.startswith(BUNDLED):
        return str(Path(__file__).resolve().parent.parent / "bundled" / source[len(BUNDLED) :])
    return os.path.expanduser(source)


def decode(data: bytes, source: str, unit: str = "line", first: int = 1) -> str:
    """``data`` (the file's text from its line ``first``) as UTF-8 (a byte-order mark skipped); bytes that are
    not UTF-8 are a DataError naming the file, the line (``unit``: ``row`` for JSONL, whose rows are its
    lines) and the byte.

    >>> decode(b'{"a": 1}\\n{"a": "\\xff"}\\n', "d.jsonl", "row")
    Traceback (most recent call last):
    posttrain.data.formats.DataError: d.jsonl: row 2: not UTF-8 text (byte 0xff at column 8); save the file as UTF-8
    """
    data = data.removeprefix(codecs.BOM_UTF8)  # (not "utf-8-sig": its error offsets would miss the BOM's bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{source}: {unit} {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, row)`` from a file, a saved dataset directory or a hub data set."""
    path = Path(resolve_source(source))
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _read_saved_dataset(path, split)
    elif not path.exists():
        if suffix in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/")):
            raise DataError(f"{source}: file not found")
        yield from _read_hub(source, split)
    elif suffix == ".jsonl":
        with _open(path, source) as f:  # bytes: a line that is not UTF-8 is named (-sig: a BOM, as Windows writes)
            for number, raw in enumerate(f, start=1):
                line = decode(raw, source, "row", number)
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{source}: row {number}: not valid JSON ({err.msg})") from None
    elif suffix == ".json":
        try:
            with _open(path, source) as f:
                data = json.loads(decode(f.read(), source))
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{source}: expected a JSON list of rows, got {type(data).__name__}")
        yield from enumerate(data, start=1)
    elif suffix == ".parquet":
        import pyarrow as pa  # a dependency of `datasets`
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{source}: not a readable parquet file ({str(err).splitlines()[0]})") from None
        yield from enumerate(table.to_pylist(), start=1)
    elif suffix == ".csv":
        with _open(path, source) as f:
            text = decode(f.read(), source)  # -sig: else a BOM renames the first column
        try:
            for number, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1):
                if None in row:  # DictReader's key for the cells beyond the header's
                    raise DataError(f"{source}: row {number}: more cells than the header has columns")
                yield number, row
        except csv.Error as err:
            raise DataError(f"{source}: not valid CSV ({err})") from None
    else:
        raise DataError(f"{source}: unknown data format {suffix!r}; use .jsonl .json .parquet .csv or a dataset dir")


def _open(path: Path, source: str) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as err:  # no permission, a broken mount ...
        raise DataError(f"{source}: cannot be read ({err.strerror or err})") from None


def _read_saved_dataset(path: Path, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: a directory but not a saved `datasets` data set ({err})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r} (has {', '.join(data)})")
        data = data[split]
    yield from enumerate(data, start=1)


def _read_hub(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; the message is what the user needs
        raise DataError(f"{name}: not a local file and could not be loaded from the hub: {err}") from None
    yield from enumerate(data, start=1)


# ----------------------------------------------------------------------------------------- validation


class _Row:
    """Field checks for one row, each raising a DataError that names file, row and field."""

    def __init__(self, source: str, number: int, row: Any) -> None:
        self.where = f"{source}: row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{self.where}: expected an object with named fields, got {type(row).__name__}")
        self.row = row

    def fail(self, field: str, message: str) -> DataError:
        return DataError(f"{self.where}: field {field!r}: {message}")

    def text_or_messages(self, field: str) -> str | Conversation:
        if field not in self.row or self.row[field] is None:
            raise self.fail(field, "missing")
        value = self.row[field]
        if isinstance(value, str):
            if not value.strip():
                raise self.fail(field, "empty")
            return value
        if isinstance(value, list):
            return self.messages(field, value)
        raise self.fail(field, f"expected a string or a list of messages, got {type(value).__name__}")

    def optional_number(self, field: str) -> float | None:
        """A finite number, or None when absent; a string holding a number counts (CSV cells are text)."""
        value = self.row.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self.fail(field, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # Real: numpy scalars too
            raise self.fail(field, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise self.fail(field, f"must be finite, got {value}")
        return float(value)

    def messages(self, field: str, value: list[Any]) -> Conversation:
        if not value:
            raise self.fail(field, "empty list of messages")
        out: Conversation = []
        for i, message in enumerate(value):
            name = f"{field}[{i}]"
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise self.fail(name, "expected a message {role, content}")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise self.fail(f"{name}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise self.fail(f"{name}.content", f"expected a string, got {type(content).__name__}")
            if not content.strip():
                raise self.fail(f"{name}.content", "empty")
            out.append({"role": role, "content": content})
        return out


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Shared prefix of two texts, cut before the whitespace that precedes the first differing word."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    cut = n
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1  # back to the start of the differing word ...
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1  # ... and before its whitespace, which BPE tokenizers attach to the word
    if cut == 0:
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_messages(chosen: Conversation, rejected: Conversation) -> tuple[Conversation, Conversation, Conversation]:
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _rstripped(value: str | Conversation) -> object:
    return value.rstrip() if isinstance(value, str) else [(m["role"], m["content"].rstrip()) for m in value]


def preference_example(source: str, number: int, row: Any) -> PreferenceExample:
    """Validate one preference row (any of the three shapes) into a :class:`PreferenceExample`."""
    r = _Row(source, number, row)
    chosen = r.text_or_messages("chosen")
    rejected = r.text_or_messages("rejected")
    if type(chosen) is not type(rejected):
        raise r.fail("rejected", "must have the same shape as 'chosen' (both strings or both message lists)")
    if chosen == rejected:
        raise r.fail("rejected", "identical to 'chosen'")
    if _rstripped(chosen) == _rstripped(rejected):  # templates and tokenizers drop such differences
        raise r.fail("rejected", "identical to 'chosen' but for trailing whitespace: no preference to learn")
    prompt: str | Conversation
    if "prompt" in r.row and r.row["prompt"] is not None:
        prompt = r.text_or_messages("prompt")
        if isinstance(chosen, list) and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and isinstance(chosen, str):
            raise r.fail("chosen", "must be a list of messages when 'prompt' is a conversation")
        if isinstance(prompt, list) and isinstance(chosen, list) and isinstance(rejected, list):
            # UltraFeedback-style rows repeat the prompt's turns at the start of both conversations.
            n = len(prompt)
            if chosen[:n] == prompt and rejected[:n] == prompt:
                chosen, rejected = chosen[n:], rejected[n:]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        parts = _split_text(chosen, rejected)
        if parts is None:
            raise r.fail("prompt", "missing, and 'chosen' and 'rejected' share no prefix to use as the prompt")
        prompt, chosen, rejected = parts
    else:
        assert isinstance(chosen, list) and isinstance(rejected, list)
        prompt, chosen, rejected = _split_messages(chosen, rejected)
        if not prompt:
            raise r.fail("prompt", "missing, and 'chosen' and 'rejected' share no leading messages")
    if isinstance(chosen, list) and isinstance(rejected, list) and isinstance(prompt, list):
        for field, conv in (("chosen", chosen), ("rejected", rejected)):
            if not conv:
                raise r.fail(field, "has no messages after the shared prompt")
            if conv[-1]["role"] != "assistant":
                raise r.fail(field, f"the conversation must end with the assistant, ends with {conv[-1]['role']!r}")
        if prompt[-1]["role"] == "assistant":
            raise r.fail("prompt", "must not end with the assistant (the completion is the assistant's turn)")
    margin = r.optional_number("margin")
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, row=number, margin=margin)


def load_preference(source: str, split: str = "train") -> list[PreferenceExample]:
    """Read and validate every row; the first bad row raises :class:`DataError`. An empty file too."""
    examples = [preference_example(source, number, row) for number, row in read_rows(source, split)]
    if not examples:
        raise DataError(f"{source}: no rows")
    return examples
