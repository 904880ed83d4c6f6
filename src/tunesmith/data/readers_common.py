"""Helpers shared by the format readers: the progress callback type and error builders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tunesmith.errors import DataError, Location

# A reader calls tick(byte_position_in_file) now and then so the caller can show progress.
Tick = Callable[[int], None]

OBJECT_EXAMPLE = 'a JSON object like {"instruction": "...", "output": "..."}'
_UTF8_FIX = "re-encode the file as UTF-8, e.g. `iconv -f gbk -t utf-8 in.json > out.json`"


def describe(value: object) -> str:
    """Name a JSON value's kind the way a user reads it ('a number', 'an array', ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def not_object(file: str, line: int | None, index: int, value: object) -> DataError:
    """The error for a record that is not a JSON object."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return DataError(
        Location(file, line, index),
        f"record {index} is {describe(value)} ({shown}), not an object",
        expected=OBJECT_EXAMPLE,
    )


def find_invalid_utf8(path: Path) -> tuple[int, int, bytes] | None:
    """(1-based line, byte offset, offending bytes) of the first invalid UTF-8 in a file, or None."""
    offset = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, offset + e.start, line[e.start : e.start + 4]
            offset += len(line)
    return None


def utf8_error(path: Path, line: int | None = None, offset: int | None = None) -> DataError:
    """The error for a file that is not UTF-8, locating the first bad byte (scans the file if not given)."""
    bad = b""
    if line is None or offset is None:
        found = find_invalid_utf8(path)
        if found is not None:
            line, offset, bad = found
    where = f" at byte offset {offset}" if offset is not None else ""
    got = f" (bytes {bad!r})" if bad else ""
    return DataError(
        Location(str(path), line),
        f"the file is not valid UTF-8{where}{got}",
        expected="UTF-8 text (a UTF-8 BOM is fine)",
        fix=_UTF8_FIX,
    )


def no_records(path: Path, file_format: str) -> DataError:
    """The error for a file that holds no records at all."""
    return DataError(
        Location(str(path)),
        f"the {file_format} file contains no records (it is empty, only whitespace, or an empty list)",
        expected="at least one record",
    )
