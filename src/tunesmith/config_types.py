"""Checking config values against type annotations, for our groups and for HF TrainingArguments.

One function, ``coerce(value, annotation)``, understands the annotations that occur in both:
bool, int, float, str, None, Literal, Enum, unions, dict, list[X] and tuple[X, ...]. Lists and
tuples also accept a comma string ("a,b"). The TrainingArguments fields are read from the installed
transformers at call time, so a newer release with new fields needs no change here.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.IGNORECASE)


class Mismatch(Exception):
    """The value does not fit the annotation; ``expected`` describes what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def describe(tp: Any) -> str:
    """A short human description of an annotation: 'int', 'one of: a, b', 'list of str'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in _arms(args))
    if origin in (list, tuple):
        return f"a list of {describe(args[0])} (or a comma string)" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None) or tp is None:
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of: " + ", ".join(str(m.value) for m in tp)
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def choices_of(tp: Any) -> tuple[str, ...]:
    """The allowed strings of a Literal or Enum annotation (also inside a union); () for other types."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return tuple(str(a) for a in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tuple(str(m.value) for m in tp)
    if origin in (Union, types.UnionType):
        return tuple(c for arm in _arms(args) for c in choices_of(arm))
    return ()


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` checked and converted to ``tp``, or raise Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        arms = _arms(args)
        # An exact fit wins over a conversion: "8" for `int | str` stays the str "8".
        for strict in (True, False):
            for arm in arms:
                try:
                    return _coerce_one(value, arm, strict)
                except Mismatch:
                    continue
        raise Mismatch(describe(tp))
    return _coerce_one(value, tp, strict=False)


def _arms(args: tuple[Any, ...]) -> list[Any]:
    # `SchedulerType | str` lets TrainingArguments take the enum's string; any other string is
    # rejected there later, so the enum alone says what is allowed.
    has_enum = any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args)
    return [a for a in args if not (has_enum and a is str)]


def _yaml_word(value: Any, choices: set) -> Any:
    """YAML 1.1 reads `no`/`off` as false and `yes`/`on` as true; a choice field meant the word."""
    if isinstance(value, bool):
        for word in ("no", "off", "false") if not value else ("yes", "on", "true"):
            if word in choices:
                return word
    return value


def _coerce_one(value: Any, tp: Any, strict: bool) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise Mismatch("null")
    if origin in (Union, types.UnionType):
        return coerce(value, tp)
    if origin is Literal:
        value = _yaml_word(value, set(args)) if not any(isinstance(a, bool) for a in args) else value
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise Mismatch(describe(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value)
        raise Mismatch("an int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int is a valid float (and keeps `save_steps: 500` as written)
        # YAML 1.1 reads `1e-4` (no dot) as a string; users mean the number.
        if not strict and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        raise Mismatch("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise Mismatch("a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        value = _yaml_word(value, {m.value for m in tp})
        if isinstance(value, tp):
            return value.value
        if isinstance(value, str) and value in {m.value for m in tp}:
            return value
        raise Mismatch(describe(tp))
    if origin is dict or tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
        raise Mismatch("a mapping")
    if origin in (list, tuple):
        if strict and not isinstance(value, (list, tuple)):
            raise Mismatch(describe(tp))
        return _coerce_sequence(value, tp, origin, args)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise Mismatch(describe(tp))


def _coerce_sequence(value: Any, tp: Any, origin: type, args: tuple[Any, ...]) -> Any:
    if value is None and origin is tuple:
        return ()  # our tuple keys: `eval_dataset: null` means none (TrainingArguments' lists take no None)
    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif value is not None and not isinstance(value, dict):
        items = [value]  # `interleave_probs: 1.0` or `lora_target: 7` mean a one-item list
    else:
        raise Mismatch(describe(tp))
    item_tp = args[0] if args else Any
    out = [coerce(item, item_tp) for item in items]
    return tuple(out) if origin is tuple else out


@dataclass(frozen=True)
class HfField:
    """One transformers.TrainingArguments field: its annotation, choices, default and help text."""

    name: str
    annotation: Any
    choices: tuple[Any, ...]
    default: Any
    help: str


def hf_training_fields() -> dict[str, HfField]:
    """The fields of the installed transformers.TrainingArguments, by name."""
    from transformers import TrainingArguments  # heavy (imports torch): only when a config is loaded

    try:
        hints = typing.get_type_hints(TrainingArguments)
    except (NameError, TypeError):  # an unresolvable forward reference: fall back per field
        hints = {}
    fields: dict[str, HfField] = {}
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name.startswith("_"):
            continue
        annotation = hints.get(f.name, f.type)
        if isinstance(annotation, str):  # unresolved: accept what the user wrote, TrainingArguments checks it
            annotation = Any
        default = None if f.default is dataclasses.MISSING else f.default
        choices = tuple(f.metadata.get("choices") or ())
        fields[f.name] = HfField(f.name, annotation, choices, default, str(f.metadata.get("help", "")))
    return fields
