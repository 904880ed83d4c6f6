"""The predictions file: one JSON line per sample, appended a batch at a time, safe to kill and resume.

Each batch's lines go to disk with one ``write`` on an ``O_APPEND`` descriptor followed by ``fsync``, so
a kill -9 loses at most the batch in flight. A kill in the middle of that write can leave a partial last
line; opening the file again cuts it off, so every line of the file is always a whole record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tunesmith.errors import DataError

PREDICTIONS = "predictions.jsonl"
META = "predictions.meta.json"


@dataclass
class PredictionFile:
    """An append-only JSONL file of records with a unique ``id``; ``done`` holds the ids already there."""

    path: Path
    done: set[str] = field(default_factory=set)
    torn_bytes: int = 0  # bytes of a partial last line cut off when the file was opened

    @classmethod
    def open(cls, path: Path, *, fresh: bool = False) -> PredictionFile:
        """Open (creating it, or emptying it when ``fresh``), cutting off a torn last line."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not path.exists():
            path.write_bytes(b"")
            return cls(path)
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        torn = len(data) - end
        if torn:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        done: set[str] = set()
        for lineno, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                done.add(orjson.loads(line)["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}:{lineno}",
                    f"not a prediction record ({e})",
                    field="id",
                    fix="delete the file (or this line) to predict those samples again",
                ) from None
        return cls(path, done, torn)

    def append(self, lines: bytes) -> None:
        """Append whole lines (each ending in a newline) with one write, then fsync."""
        if not lines:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(lines)
            while view:  # a regular file takes it in one write; loop only for the rare short write
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def reorder(self, order: list[str]) -> None:
        """Rewrite the file with its records in ``order`` (ids not in it keep their place after), atomically."""
        lines = [ln for ln in self.path.read_bytes().splitlines() if ln.strip()]
        by_id = {orjson.loads(ln)["id"]: ln for ln in lines}
        rank = {i: k for k, i in enumerate(order)}
        ids = sorted(by_id, key=lambda i: rank.get(i, len(rank)))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(by_id[i] + b"\n" for i in ids))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def record_line(
    row: dict[str, Any],
    sample_id: str,
    completions: list[Any],
    settings: dict[str, Any],
    extra_columns: list[str],
) -> bytes:
    """One sample's JSON line (LLaMA-Factory's prompt/predict/label names, plus what makes it traceable)."""
    first = completions[0]
    rec: dict[str, Any] = {
        "id": sample_id,
        "messages": orjson.loads(row["prompt_messages"]),
        "prompt": row["prompt_text"],
        "predict": first.text,
        "label": row["label_text"],
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": first.completion_tokens,
        "finish_reason": first.finish_reason,
        "settings": settings,
        "extra": {k: row[k] for k in extra_columns},
    }
    if len(completions) > 1:
        rec["samples"] = [
            {"predict": c.text, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
            for c in completions
        ]
    return orjson.dumps(rec) + b"\n"


def read_meta(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / META
    return orjson.loads(path.read_bytes()) if path.exists() else None


def write_meta(out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write predictions.meta.json atomically."""
    path = out_dir / META
    tmp = path.with_name(META + ".tmp")
    tmp.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)
    return path


__all__ = ["META", "PREDICTIONS", "PredictionFile", "read_meta", "record_line", "write_meta"]
