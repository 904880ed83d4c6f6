"""Content-addressed on-disk cache for converted and tokenized data.

A cache entry is a folder named by the hash of everything that affects its content (data bytes,
tokenizer, template, cutoff, masking policy, the data package's own source code) and nothing else, so
a second run with the same inputs reuses it, and any change that would change tokens misses it.
Entries are written to a temporary folder and renamed into place, so a crash never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 22


def file_digest(path: str | Path) -> str:
    """sha1 of a file's bytes (the digest LLaMA-Factory's `file_sha1` uses)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_digest(paths: Iterable[str | Path]) -> str:
    """One digest over several files' names and contents."""
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of the data package's source and template files: code changes invalidate the cache."""
    root = Path(__file__).parent
    files = sorted(
        p for p in root.rglob("*") if p.suffix in (".py", ".yaml", ".yml", ".json") and p.is_file()
    )
    h = hashlib.sha1()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of everything in a tokenizer that can change token ids or the rendered text."""
    h = hashlib.sha1()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers; slow ones fall back to vocab
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    h.update(str(tokenizer.chat_template or "").encode())
    h.update(str(tokenizer.padding_side).encode())
    return h.hexdigest()


def key_of(parts: dict[str, Any]) -> str:
    """A stable key from a JSON-serialisable mapping of inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class DataCache:
    """Folders under `root/<kind>/<key>`; `complete` marks a finished entry."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        p = self.path(kind, key)
        return p if (p / "complete").exists() else None

    def staging(self, kind: str) -> Path:
        """A fresh temporary folder on the same filesystem as the final entry."""
        (self.root / kind).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root / kind))

    def commit(self, staging: Path, kind: str, key: str, meta: dict[str, Any]) -> Path:
        """Atomically publish a staged entry (another process may have published the same key)."""
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=str, ensure_ascii=False))
        (staging / "complete").touch()
        final = self.path(kind, key)
        try:
            os.replace(staging, final)
        except OSError:  # the key exists already: same inputs, same content; keep the first
            shutil.rmtree(staging, ignore_errors=True)
        return final
