"""Chat template YAML files -> Template objects, checked field by field against the dataclasses' types.

Every problem of a file is reported at once, each naming the template, the field, the value and a fix
(docs/templates.md describes the schema).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tunesmith.data.templates import Template
from tunesmith.data.tools import get_tool_format
from tunesmith.errors import ConfigError, Problem, TunesmithError

_NOT_YAML = ("name", "source")


def load_template_file(path: Path) -> dict[str, Template]:
    """Every template of one YAML file (a mapping of name -> fields); all problems reported at once."""
    if not path.is_file():
        raise TunesmithError(f"template file {path} does not exist; give a built-in name or a .yaml path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TunesmithError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise TunesmithError(f"{path}: expected a mapping of template name -> fields (see docs/templates.md)")
    problems: list[Problem] = []
    out = {}
    for name, raw in data.items():
        before = len(problems)
        values = _build(Template, raw, str(name), problems)
        if len(problems) > before:
            continue
        eos, header = values["eos"], values["assistant"].header
        values["stop_words"] = tuple(dict.fromkeys([eos, *values.get("stop_words", ())]))
        values.setdefault("generation_prompt", header)
        template = Template(name=str(name), source=str(path), **values)
        _check_template(template, problems)
        out[str(name)] = template
    if problems:
        raise ConfigError(problems, source=str(path))
    return out


def _build(cls: type, raw: Any, where: str, problems: list[Problem]) -> dict[str, Any]:
    """Field values for dataclass ``cls`` from a YAML mapping, checked against its type hints."""
    if not isinstance(raw, dict):
        problems.append(Problem(where, "expected a mapping of fields", raw))
        return {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_YAML}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean {close[0]!r}?" if close else "remove it"
            problems.append(Problem(f"{where}.{key}", "unknown field", None, ", ".join(fields), fix))
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(hints[name], raw[name], f"{where}.{name}", problems)
        elif f.default is dataclasses.MISSING:
            problems.append(Problem(f"{where}.{name}", "required field is missing"))
    return values


def _convert(tp: Any, value: Any, where: str, problems: list[Problem]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: null means "not set"
        return None if value is None else _convert(args[0], value, where, problems)
    if dataclasses.is_dataclass(tp):
        return (
            tp(**_build(tp, value, where, problems))
            if isinstance(value, dict)
            else _bad(where, value, problems)
        )
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        fix = f"use {close[0]!r}" if close else ""
        problems.append(Problem(where, "not an allowed value", value, ", ".join(map(str, args)), fix))
    elif tp is str and isinstance(value, str) or tp is bool and isinstance(value, bool):
        return value
    elif tp == tuple[tuple[str, Any], ...] and isinstance(value, dict):
        return tuple(value.items())
    elif origin is tuple and isinstance(value, list):
        return tuple(_convert(args[0], v, where, problems) for v in value)
    else:
        _bad(where, value, problems, tp)
    return None


def _bad(where: str, value: Any, problems: list[Problem], tp: Any = "mapping") -> None:
    expected = getattr(tp, "__name__", str(tp)).replace("typing.", "")
    problems.append(Problem(where, f"expected {expected} (quote strings in YAML)", value))


def _check_template(t: Template, problems: list[Problem]) -> None:
    """Cross-field checks: every format holds {content}; the tool format exists."""
    formats = {"user": t.user, "assistant.body": t.assistant.body}
    if t.system_placement != "unsupported":
        formats["system"] = t.system
    if t.tool is not None:
        formats["tool.format"] = t.tool.format
    for label, fmt in formats.items():
        if "{content}" not in fmt:
            problems.append(Problem(f"{t.name}.{label}", "must contain {content}", fmt))
    if t.tool_format:
        try:
            get_tool_format(t.tool_format)
        except TunesmithError as exc:
            problems.append(Problem(f"{t.name}.tool_format", str(exc), t.tool_format))
