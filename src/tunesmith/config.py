"""Load a config strictly: a YAML/JSON file, then ``key=value`` overrides, into typed groups.

    cfg = load_config("sft.yaml", ["lora_rank=16", "dataset=alpaca_en_demo,identity"])
    cfg.finetuning.lora_rank  # 16

Keys are flat and named as in LLaMA-Factory (plus every transformers.TrainingArguments field), so a
LLaMA-Factory YAML loads unchanged. Precedence, lowest first: defaults, environment variables (see
``read_environment``), the file, the overrides. Every problem (unknown key, wrong type, value out of
range, conflicting keys) is collected and raised at once as one ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import operator
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config_checks import cross_field_problems, resolve_defaults, unused_key_warnings
from tunesmith.config_schema import (
    GROUPS,
    HF_TRANSLATED_KEYS,
    LLAMAFACTORY_UNSUPPORTED,
    REMOVED_HF_KEYS,
    SECRET_KEYS,
    Config,
    TrainingArgs,
)
from tunesmith.config_types import HfField, Mismatch, choices_of, coerce, describe, hf_training_fields
from tunesmith.errors import ConfigError, Problem

__all__ = [
    "Config",
    "ENV_VARS",
    "RESOLVED_CONFIG_NAME",
    "load_config",
    "parse_override_value",
    "read_environment",
    "write_resolved_config",
]

RESOLVED_CONFIG_NAME = "tunesmith_config.yaml"

# Environment variable -> the config key it gives a default for (file and overrides win).
ENV_VARS: dict[str, str] = {
    "TUNESMITH_CACHE": "data_cache_dir",
    "API_HOST": "api_host",
    "API_PORT": "api_port",
    "API_KEY": "api_key",
}


@dataclass(frozen=True)
class _Entry:
    """A raw value and where it came from ("line 12", "override", "environment variable X")."""

    value: Any
    origin: str = ""

    @property
    def at(self) -> str:
        """The origin as a message prefix: '(line 12) ', '(override) ' or ''."""
        return f"({self.origin}) " if self.origin else ""


def read_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables tunesmith reads (ENV_VARS), from ``environ`` or os.environ.

    This is the only place tunesmith's own code reads the environment.
    """
    env = os.environ if environ is None else environ
    return {name: env[name] for name in ENV_VARS if name in env}


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load, validate and resolve a config; raise ConfigError listing every problem.

    ``overrides`` are ``key=value`` strings (values parsed YAML-style) or a mapping of typed values.
    ``environ`` replaces os.environ (for tests and embedding).
    """
    source = "" if path is None else str(path)
    file_entries = _read_config_file(Path(path)) if path is not None else {}
    override_entries, problems = _parse_overrides(overrides)
    env_entries = {
        ENV_VARS[name]: _Entry(value, f"environment variable {name}")
        for name, value in read_environment(environ).items()
    }
    entries = {**env_entries, **file_entries, **override_entries}
    explicit = set(file_entries) | set(override_entries)
    return _build(entries, explicit, problems, source)


def write_resolved_config(cfg: Config, out_dir: str | Path) -> Path:
    """Write the flat resolved config to ``out_dir/tunesmith_config.yaml`` (secrets left out)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {key: value for key, value in cfg.to_flat_dict().items() if key not in SECRET_KEYS}
    header = (
        f"# Resolved tunesmith config (from {cfg.source or 'overrides'}); every key shown with its value.\n"
        f"# Secrets ({', '.join(SECRET_KEYS)}) are never written: give them by override or environment.\n"
    )
    path = out / RESOLVED_CONFIG_NAME
    path.write_text(header + yaml_text(flat), encoding="utf-8")
    return path


def yaml_text(values: Mapping[str, Any]) -> str:
    """Config keys and values as YAML, in the given order (``yaml.safe_load`` gives them back)."""
    return yaml.safe_dump(_plain(values), sort_keys=False, allow_unicode=True)


def yaml_scalar(value: Any) -> str:
    """How a value is written in YAML on one line: 8, true, cosine; a tuple as its comma list."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return yaml.safe_dump(_plain(value), default_flow_style=True).removesuffix("\n...\n").strip()


def _plain(value: Any) -> Any:
    """A value YAML's safe dumper writes: tuples as lists, paths as text, enums as their value."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def parse_override_value(text: str) -> Any:
    """Parse an override value YAML-style: '8' -> 8, 'true' -> True, 'a,b' -> 'a,b', '' -> None.

    Only text that starts with '[' or '{' becomes a list or mapping, so 'You are: kind' stays a str.
    """
    stripped = text.strip()
    try:
        value = yaml.safe_load(stripped)
    except yaml.YAMLError:
        return stripped
    if isinstance(value, (dict, list)) and not stripped.startswith(("[", "{")):
        return stripped
    return value


def _parse_overrides(
    overrides: Sequence[str] | Mapping[str, Any] | None,
) -> tuple[dict[str, _Entry], list[Problem]]:
    entries: dict[str, _Entry] = {}
    problems: list[Problem] = []
    if overrides is None:
        return entries, problems
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if isinstance(key, str):
                entries[key] = _Entry(value, "override")
            else:
                problems.append(Problem("(override)", "override keys must be strings", value=key))
        return entries, problems
    for item in [overrides] if isinstance(overrides, str) else overrides:
        key, eq, text = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not eq or not key.strip():
            problems.append(
                Problem(
                    "(override)",
                    "an override must look like key=value",
                    value=item,
                    fix="e.g. lora_rank=16 or dataset=alpaca_en_demo,identity",
                )
            )
            continue
        entries[key.strip()] = _Entry(parse_override_value(text), "override")
    return entries, problems


def _read_config_file(path: Path) -> dict[str, _Entry]:
    source = str(path)

    def fail(message: str, fix: str, value: object = None) -> ConfigError:
        return ConfigError([Problem("(file)", message, value=value, fix=fix)], source)

    if not path.exists():
        raise fail("config file not found", f"check the path (relative paths start at {Path.cwd()})")
    if not path.is_file():
        raise fail("not a file", "give the path of a .yaml, .yml or .json config file")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise fail("unsupported config file type", "use a .yaml, .yml or .json file", value=suffix)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
    entries, problems = _parse_json(text) if suffix == ".json" else _parse_yaml(text)
    if problems:
        raise ConfigError(problems, source)
    return entries


def _parse_yaml(text: str) -> tuple[dict[str, _Entry], list[Problem]]:
    entries: dict[str, _Entry] = {}
    problems: list[Problem] = []
    # Composing first keeps each key's line and lets duplicate keys fail (PyYAML keeps the last silently).
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return entries, problems
        if not isinstance(node, yaml.MappingNode):
            line = node.start_mark.line + 1
            problems.append(
                Problem(
                    "(file)",
                    f"line {line}: the top level must be a mapping of key: value",
                    fix="write one 'key: value' per line, e.g. lora_rank: 8",
                )
            )
            return entries, problems
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            where = f"line {key_node.start_mark.line + 1}"
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                problems.append(Problem(str(key), f"{where}: keys must be strings", value=key))
            elif key in entries:
                problems.append(
                    Problem(
                        key,
                        f"{where}: duplicate key, first set on {entries[key].origin}",
                        fix="keep only one of them",
                    )
                )
            else:
                entries[key] = _Entry(loader.construct_object(value_node, deep=True), where)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problems.append(
            Problem(
                "(syntax)",
                f"{where}invalid YAML: {e.problem or e.context}",
                fix="check indentation, the ': ' after each key and unclosed quotes or brackets",
            )
        )
    except yaml.YAMLError as e:
        problems.append(Problem("(syntax)", f"invalid YAML: {e}"))
    finally:
        loader.dispose()
    return entries, problems


def _parse_json(text: str) -> tuple[dict[str, _Entry], list[Problem]]:
    duplicates: list[str] = []

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        return {}, [Problem("(syntax)", f"line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}")]
    if not isinstance(data, dict):
        return {}, [Problem("(file)", "the top level must be a JSON object of key: value")]
    problems = [Problem(key, "duplicate key", fix="keep only one of them") for key in duplicates]
    return {key: _Entry(value) for key, value in data.items()}, problems


def _own_fields() -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Every key of our groups -> (its dataclass field, its resolved annotation)."""
    table: dict[str, tuple[dataclasses.Field[Any], Any]] = {}
    for cls in GROUPS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name != "hf":
                table[f.name] = (f, hints[f.name])
    return table


def _build(entries: dict[str, _Entry], explicit: set[str], problems: list[Problem], source: str) -> Config:
    own = _own_fields()
    hf_fields = {name: f for name, f in hf_training_fields().items() if name not in own}
    values = {name: f.default for name, (f, _) in own.items()}
    hf: dict[str, Any] = {}
    for key, entry in entries.items():
        at = entry.at
        if key in own:
            field, annotation = own[key]
            checked = _check_value(key, entry, annotation, field.default, problems)
            if checked is not _INVALID:
                problems.extend(_bound_problems(key, at, checked, field.metadata))
                values[key] = checked
        elif key in HF_TRANSLATED_KEYS and key not in hf_fields and HF_TRANSLATED_KEYS[key] in hf_fields:
            _translate(key, entry, entries, hf, problems)
        elif key in hf_fields:
            checked = _check_value(key, entry, hf_fields[key].annotation, hf_fields[key].default, problems)
            if checked is not _INVALID and _in_choices(key, at, checked, hf_fields[key], problems):
                hf[key] = checked
        elif key in REMOVED_HF_KEYS:
            problems.append(
                Problem(
                    key,
                    f"{at}no longer a transformers.TrainingArguments key",
                    value=entry.value,
                    fix=REMOVED_HF_KEYS[key],
                )
            )
        elif key in LLAMAFACTORY_UNSUPPORTED:
            problems.append(
                Problem(
                    key,
                    f"{at}a LLaMA-Factory key not supported by tunesmith yet",
                    value=entry.value,
                    fix="remove it from the config",
                )
            )
        else:
            problems.append(_unknown_key(key, at, entry, [*own, *hf_fields, *HF_TRANSLATED_KEYS]))
    values = resolve_defaults(values)
    problems.extend(cross_field_problems(values, hf, explicit, {k: e.origin for k, e in entries.items()}))
    if problems:
        raise ConfigError(problems, source)
    groups = {}
    for name, cls in GROUPS.items():
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name != "hf"}
        groups[name] = TrainingArgs(**kwargs, hf=hf) if cls is TrainingArgs else cls(**kwargs)
    return Config(**groups, source=source, warnings=tuple(unused_key_warnings(values, explicit)))


_INVALID = object()  # marks a value that failed its check (None is a valid value)


def _check_value(key: str, entry: _Entry, annotation: Any, default: Any, problems: list[Problem]) -> Any:
    try:
        return coerce(entry.value, annotation)
    except Mismatch as e:
        allowed = describe(annotation)
        options = choices_of(annotation)
        if options and isinstance(entry.value, str):
            close = difflib.get_close_matches(entry.value, options, n=1, cutoff=0.6)
            fix = f"did you mean {close[0]}?" if close else f"use one of the allowed values for {key}"
            problems.append(Problem(key, f"{entry.at}not an allowed value", entry.value, allowed, fix))
        else:
            example = f", e.g. {key}: {yaml_scalar(default)}" if default not in (None, "", ()) else ""
            if isinstance(entry.value, bool) and _accepts_text(annotation):
                example += " (quote text that YAML reads as a bool: yes, no, on, off, true, false)"
            problems.append(
                Problem(key, f"{entry.at}wrong type", entry.value, allowed, f"write {e.expected}{example}")
            )
        return _INVALID


def _accepts_text(annotation: Any) -> bool:
    try:
        coerce("text", annotation)
    except Mismatch:
        return False
    return True


_BOUNDS = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}


def _bound_problems(key: str, at: str, value: Any, metadata: Mapping[str, Any]) -> list[Problem]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return []
    limits = [(test, sign, metadata[name]) for name, (test, sign) in _BOUNDS.items() if name in metadata]
    if all(test(value, bound) for test, _, bound in limits):
        return []
    allowed = "a number " + " and ".join(f"{sign} {bound}" for _, sign, bound in limits)
    return [Problem(key, f"{at}out of range", value=value, allowed=allowed, fix=f"set {key} to {allowed}")]


def _in_choices(key: str, at: str, value: Any, field: HfField, problems: list[Problem]) -> bool:
    if not field.choices or value is None or value in field.choices:
        return True
    problems.append(
        Problem(
            key,
            f"{at}not an allowed value",
            value=value,
            allowed=", ".join(map(str, field.choices)),
            fix=f"use one of the allowed values for {key}",
        )
    )
    return False


def _translate(
    key: str, entry: _Entry, entries: dict[str, _Entry], hf: dict[str, Any], problems: list[Problem]
) -> None:
    """warmup_ratio (transformers 4) -> warmup_steps, which in transformers 5 reads a value < 1 as a ratio."""
    new = HF_TRANSLATED_KEYS[key]
    at = entry.at
    if new in entries:
        problems.append(
            Problem(
                key,
                f"{at}{key} and {new} are both set",
                value=entry.value,
                fix=f"keep only {new} (a value below 1 is a share of the total steps)",
            )
        )
        return
    try:
        ratio = coerce(entry.value, float)
    except Mismatch:
        ratio = None
    if ratio is None or not 0 <= ratio < 1:
        problems.append(
            Problem(
                key,
                f"{at}must be a number in [0, 1)",
                value=entry.value,
                allowed="0 <= value < 1",
                fix=f"e.g. {key}: 0.1",
            )
        )
        return
    hf[new] = ratio


def _unknown_key(key: str, at: str, entry: _Entry, valid: list[str]) -> Problem:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    close += [k for k in valid if k.lower() == key.lower() and k not in close]
    fix = (
        f"did you mean {' or '.join(close)}?"
        if close
        else "remove it (see the tunesmith config keys in --help)"
    )
    return Problem(key, f"{at}unknown key", value=entry.value, fix=fix)
