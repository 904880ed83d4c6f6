"""User-facing errors. The CLI prints these without a traceback and exits non-zero.

Every message says what is wrong, where (file, line, key or field), what is allowed, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass


class TunesmithError(Exception):
    """An error the user can fix; its message is complete on its own."""


@dataclass(frozen=True)
class Problem:
    """One problem of a config: where it is, what is wrong, and how to fix it."""

    key: str
    message: str
    value: object = None
    allowed: str = ""
    fix: str = ""

    def render(self, source: str = "") -> str:
        where = f"{source}: " if source else ""
        parts = [f"{where}{self.key}: {self.message}"]
        if self.value is not None:
            parts.append(f"got {self.value!r}")
        if self.allowed:
            parts.append(f"allowed: {self.allowed}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " | ".join(parts)


class ConfigError(TunesmithError):
    """All problems of one config, reported together."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{len(problems)} problem(s) in config {source or '(overrides)'}:"
        super().__init__("\n".join([head] + ["  - " + p.render() for p in problems]))


@dataclass(frozen=True)
class Location:
    """Where a record came from: file, 1-based line when the format has lines, 0-based record index."""

    file: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        s = self.file
        if self.line is not None:
            s += f":{self.line}"
        if self.index is not None:
            s += f" (record {self.index})"
        return s


class DataError(TunesmithError):
    """A problem with a data file or one of its rows, naming file, line, field and what was expected."""

    def __init__(
        self,
        where: Location | str,
        message: str,
        field: str | None = None,
        expected: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.where = where
        self.field = field
        self.expected = expected
        self.reason = message
        text = f"{where}: "
        if field:
            text += f"field {field!r}: "
        text += message
        if expected:
            text += f" (expected {expected})"
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)
