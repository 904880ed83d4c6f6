"""The dataset registry: LLaMA-Factory's dataset_info.json schema -> DatasetSpec, or a plain path detected.

A spec says where a dataset lives (a local file/folder or the Hugging Face hub) and how its records map to
canonical rows (formatting, columns, tags). Reading the records is load.py's job.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from tunesmith.data.readers import iter_records
from tunesmith.errors import ConfigError, DataError, Problem

Formatting = Literal["alpaca", "sharegpt", "openai"]
Kind = Literal["sft", "ranking", "kto", "text"]

FORMATTINGS: tuple[str, ...] = ("alpaca", "sharegpt", "openai")
ENTRY_KEYS: tuple[str, ...] = (
    "file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "subset",
    "folder", "split", "num_samples", "file_sha1", "formatting", "ranking", "columns", "tags",
)  # fmt: skip
SOURCE_KEYS: tuple[str, ...] = (
    "file_name",
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
)
MEDIA_COLUMNS: tuple[str, ...] = ("images", "videos", "audios")
INFO_FILE = "dataset_info.json"


@dataclass(frozen=True)
class Columns:
    """Which record key holds each part of a sample (None: the dataset has no such column)."""

    prompt: str | None = None
    query: str | None = None
    response: str | None = None
    history: str | None = None
    system: str | None = None
    tools: str | None = None
    messages: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None

    def used(self) -> set[str]:
        """The record keys these columns map (everything else is passed through as Row['extra'])."""
        return {v for v in (getattr(self, f.name) for f in fields(self)) if v is not None}


@dataclass(frozen=True)
class Tags:
    """Keys and role names of conversation messages (sharegpt defaults)."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"


OPENAI_TAGS = Tags("role", "content", "user", "assistant", "tool", "function_call", "system")
COLUMN_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Columns))
TAG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Tags))


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where it lives and how its records map to canonical rows."""

    name: str
    file_name: str | None = None  # relative to dataset_dir (or absolute for a plain path)
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    subset: str | None = None
    folder: str | None = None
    split: str = "train"
    num_samples: int | None = None
    file_sha1: str | None = None
    formatting: Formatting = "alpaca"
    ranking: bool = False
    columns: Columns = field(default_factory=Columns)
    tags: Tags = field(default_factory=Tags)
    info_file: str | None = None  # the dataset_info.json that registered it (for error messages)

    @property
    def kind(self) -> Kind:
        """What rows this dataset gives: sft conversations, ranking pairs, kto-tagged, or plain text."""
        if self.ranking:
            return "ranking"
        if self.columns.kto_tag is not None:
            return "kto"
        if self.formatting == "alpaca" and self.columns.response is None:
            return "text"
        return "sft"

    @property
    def where(self) -> str:
        """Where this dataset was defined, for error messages."""
        return f"{self.info_file} [{self.name}]" if self.info_file else self.name

    def local_path(self, dataset_dir: str | Path) -> Path | None:
        """The local file or folder of a file_name dataset; None for a hub dataset."""
        if self.file_name is None:
            return None
        return Path(dataset_dir).expanduser() / self.file_name


def load_dataset_info(dataset_dir: str | Path) -> dict[str, DatasetSpec]:
    """Parse ``dataset_dir/dataset_info.json`` strictly; every problem of every entry is reported at once."""
    path = Path(dataset_dir).expanduser() / INFO_FILE
    if not path.is_file():
        raise DataError(
            str(path), "dataset_info.json not found", fix="set dataset_dir to the folder holding it"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", f"not valid JSON: {e.msg}") from e
    if not isinstance(raw, dict):
        raise DataError(str(path), "must hold a JSON object of dataset entries", expected='{"name": {...}}')
    problems: list[Problem] = []
    specs: dict[str, DatasetSpec] = {}
    for name, entry in raw.items():
        spec = _parse_entry(name, entry, str(path), problems)
        if spec is not None:
            specs[name] = spec
    if problems:
        raise ConfigError(problems, source=str(path))
    return specs


def _suggest(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _parse_entry(name: str, entry: Any, info_file: str, problems: list[Problem]) -> DatasetSpec | None:
    if not isinstance(entry, dict):
        problems.append(Problem(name, "an entry must be a JSON object", value=entry))
        return None
    start = len(problems)
    unknown = [key for key in entry if key not in ENTRY_KEYS]
    for key in unknown:
        fix = _suggest(key, ENTRY_KEYS)
        problems.append(Problem(f"{name}.{key}", "unknown key", allowed=", ".join(ENTRY_KEYS), fix=fix))
    for key in (*SOURCE_KEYS, "subset", "folder", "split", "file_sha1"):
        if key in entry and not isinstance(entry[key], str):
            problems.append(Problem(f"{name}.{key}", "must be a string", value=entry[key]))
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        allowed = ", ".join(FORMATTINGS)
        problems.append(
            Problem(f"{name}.formatting", "unknown formatting", value=formatting, allowed=allowed)
        )
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        problems.append(Problem(f"{name}.ranking", "must be true or false", value=ranking))
    num = entry.get("num_samples")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        problems.append(Problem(f"{name}.num_samples", "must be a positive integer", value=num))
    # An unknown key is likely the misspelt source: report it once, not also as "no data source".
    if not unknown and not any(k in entry for k in SOURCE_KEYS):
        problems.append(Problem(name, "no data source", allowed="file_name, hf_hub_url", fix="add file_name"))
    col_map = _string_map(name, "columns", entry.get("columns"), COLUMN_KEYS, problems)
    tag_map = _string_map(name, "tags", entry.get("tags"), TAG_KEYS, problems)
    if len(problems) > start:
        return None
    columns = _columns(formatting, ranking, col_map)
    tags = replace(OPENAI_TAGS if formatting == "openai" else Tags(), **(tag_map or {}))
    scalars = {k: v for k, v in entry.items() if k not in ("columns", "tags")}
    spec = DatasetSpec(name=name, columns=columns, tags=tags, info_file=info_file, **scalars)
    for message in _structure_problems(spec):
        problems.append(Problem(name, message))
    return spec


def _string_map(
    name: str, key: str, value: Any, allowed: tuple[str, ...], problems: list[Problem]
) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(Problem(f"{name}.{key}", "must be a JSON object", value=value))
        return None
    for k, v in value.items():
        if k not in allowed:
            problems.append(
                Problem(
                    f"{name}.{key}.{k}", "unknown key", allowed=", ".join(allowed), fix=_suggest(k, allowed)
                )
            )
        elif not isinstance(v, str):
            problems.append(Problem(f"{name}.{key}.{k}", "must be a string", value=v))
    return value


def _columns(formatting: str, ranking: bool, given: dict[str, str] | None) -> Columns:
    """LLaMA-Factory's column defaults: they apply only when the entry gives no "columns" at all."""
    if given is None:
        base: dict[str, str] = {"prompt": "instruction", "query": "input", "response": "output"}
        if formatting != "alpaca":
            base = {"messages": "conversations" if formatting == "sharegpt" else "messages"}
        if ranking:
            base |= {"chosen": "chosen", "rejected": "rejected"}
            base.pop("response", None)
        return Columns(**base)
    if formatting != "alpaca" and "messages" not in given:
        given = {**given, "messages": "conversations" if formatting == "sharegpt" else "messages"}
    return Columns(**given)


def _structure_problems(spec: DatasetSpec) -> list[str]:
    c = spec.columns
    out = []
    if spec.formatting == "alpaca" and c.prompt is None:
        out.append("alpaca formatting needs a 'prompt' column (columns.prompt)")
    if spec.ranking and (c.chosen is None or c.rejected is None):
        out.append("ranking datasets need 'chosen' and 'rejected' columns")
    return out


def verify_sha1(path: Path, expected: str) -> None:
    """Fail unless the file's SHA-1 equals ``expected`` (dataset_info.json's file_sha1)."""
    if not path.is_file():
        raise DataError(
            str(path), "file_sha1 can only be checked for a single file, not a folder", field="file_sha1"
        )
    digest = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual.lower() != expected.lower():
        raise DataError(
            str(path), f"SHA-1 mismatch: file has {actual}, dataset_info.json says {expected}", field="file_sha1",
            fix="replace the file with the expected one, or update file_sha1",
        )  # fmt: skip


def resolve_dataset(name_or_path: str, dataset_dir: str | Path) -> DatasetSpec:
    """A dataset registered in ``dataset_dir/dataset_info.json``, or a plain file/folder path (format detected)."""
    dataset_dir = Path(dataset_dir).expanduser()
    info = dataset_dir / INFO_FILE
    specs = load_dataset_info(dataset_dir) if info.is_file() else {}
    if name_or_path in specs:
        return check_supported(specs[name_or_path], dataset_dir)
    for candidate in (Path(name_or_path).expanduser(), dataset_dir / name_or_path):
        if candidate.exists():
            return check_supported(detect_spec(candidate.resolve()), dataset_dir)
    close = difflib.get_close_matches(name_or_path, list(specs), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"{len(specs)} datasets are registered"
    raise DataError(
        str(info), f"unknown dataset {name_or_path!r}: not registered and not an existing file or folder ({hint})",
        fix=f"use a name from {info}, add an entry there, or give the path of a data file",
    )  # fmt: skip


def check_supported(spec: DatasetSpec, dataset_dir: str | Path) -> DatasetSpec:
    """Reject what tunesmith cannot load yet (media columns, non-HF hubs, scripts, cloud files) and missing files."""
    for col in MEDIA_COLUMNS:
        if getattr(spec.columns, col) is not None:
            raise DataError(
                spec.where, f"multimodal datasets are not supported yet (column {col!r})", field=f"columns.{col}",
                fix="use a text-only dataset",
            )  # fmt: skip
    path = spec.local_path(dataset_dir)
    if path is not None:
        if not path.exists():
            raise DataError(spec.where, f"data file not found: {path}", field="file_name",
                            fix="check file_name and dataset_dir")  # fmt: skip
        return spec
    if spec.hf_hub_url is not None:
        return spec
    for key in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
        if getattr(spec, key) is not None:
            raise DataError(spec.where, f"{key} datasets are not supported", field=key,
                            fix="use hf_hub_url or a local file (file_name)")  # fmt: skip
    raise DataError(spec.where, "no data source", field="file_name", fix="add file_name or hf_hub_url")


def detect_spec(path: Path) -> DatasetSpec:
    """A spec for a plain file/folder, from the keys of its first record."""
    first = next(iter(iter_records(path)), None)
    if first is None:
        raise DataError(str(path), "no records found; cannot detect the dataset format")
    data = first.data
    media = [k for k in MEDIA_COLUMNS if k in data]
    if media:
        raise DataError(
            str(first.where),
            f"multimodal datasets are not supported yet (column {media[0]!r})",
            field=media[0],
        )
    spec = _detect(data)
    if spec is None:
        raise DataError(
            str(first.where), f"cannot detect the dataset format from keys {sorted(data)}",
            expected="instruction/output (alpaca), conversations with from/value (sharegpt), messages with "
            "role/content (openai), text (pretraining), or chosen/rejected (ranking)",
            fix=f"register it in {INFO_FILE} with formatting and columns",
        )  # fmt: skip
    return replace(spec, name=str(path), file_name=str(path))


def _detect(data: dict[str, Any]) -> DatasetSpec | None:
    def present(*keys: str) -> dict[str, str]:
        return {k: k for k in keys if k in data}

    ranking = "chosen" in data and "rejected" in data
    pair = {"chosen": "chosen", "rejected": "rejected"} if ranking else {}
    kto_key = next((k for k in ("kto_tag", "label") if isinstance(data.get(k), bool)), None)
    kto = {"kto_tag": kto_key} if kto_key else {}
    for key in ("messages", "conversations"):
        turns = data.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            cols = Columns(messages=key, **present("system", "tools"), **pair, **kto)
            if "from" in turns[0] and "value" in turns[0]:
                return DatasetSpec(name="", formatting="sharegpt", ranking=ranking, columns=cols)
            if "role" in turns[0] and "content" in turns[0]:
                return DatasetSpec(
                    name="", formatting="openai", ranking=ranking, columns=cols, tags=OPENAI_TAGS
                )
            return None
    prompt = next((k for k in ("instruction", "prompt") if k in data), None)
    if prompt is not None and (ranking or "output" in data):
        extra = present("system", "history", "tools")
        query = {"query": "input"} if "input" in data else {}
        response = {} if ranking else {"response": "output"}
        cols = Columns(prompt=prompt, **query, **response, **extra, **pair, **kto)
        return DatasetSpec(name="", formatting="alpaca", ranking=ranking, columns=cols)
    if "text" in data:
        return DatasetSpec(name="", formatting="alpaca", columns=Columns(prompt="text"))
    return None
