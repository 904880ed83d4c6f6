"""Streaming readers: json (array), jsonl, csv, parquet, arrow, txt files and folders of them -> Records.

Memory stays bounded by a fixed read chunk plus the largest record; every problem is a DataError that
names the file, line and record index. Example::

    for rec in iter_records("data/alpaca.json", show_progress=True):
        rec.data["instruction"], str(rec.where)  # "data/alpaca.json:12 (record 3)"
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.readers_common import Tick, no_records
from tunesmith.data.readers_json import read_json, read_jsonl, sniff_json
from tunesmith.data.readers_table import read_arrow, read_csv, read_parquet, read_txt
from tunesmith.data.types import Record
from tunesmith.errors import DataError, Location

_READERS: dict[str, Callable[[Path, Tick], Iterator[Record]]] = {
    "json": read_json,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet,
    "arrow": read_arrow,
    "txt": read_txt,
}
_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "txt",
}
_KIND = {".json": "json", ".jsonl": "json"}  # files that may share a folder: json and jsonl read alike
# Metadata that `datasets.save_to_disk` and LLaMA-Factory keep next to the data; never records.
_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json"}
_SUPPORTED = ", ".join(_EXTENSIONS)


@dataclass
class ReadStats:
    """What a read did: rows yielded, bytes of input, wall-clock seconds."""

    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def detect_file_format(path: Path) -> str:
    """The format of a data file by extension, with .json/.jsonl sniffed by content; a folder's file format."""
    path = Path(path)
    if path.is_dir():
        return detect_file_format(list_data_files(path)[0])
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            Location(str(path)),
            f"unknown data file extension {path.suffix or '(none)'!r}",
            expected=f"one of {_SUPPORTED}",
            fix="rename the file or convert it",
        )
    if fmt in ("json", "jsonl"):
        try:
            return sniff_json(path)
        except OSError as e:
            raise DataError(Location(str(path)), f"cannot read the file: {e.strerror or e}") from None
    return fmt


def list_data_files(path: Path) -> list[Path]:
    """A file -> [file]; a folder -> its data files (recursively, sorted), which must be of one kind."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            Location(str(path)), "no such file or folder", expected="a data file or a folder of them"
        )
    if not path.is_dir():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _EXTENSIONS
        and p.name not in _METADATA_FILES
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(
            Location(str(path)), "the folder contains no data files", expected=f"files ending in {_SUPPORTED}"
        )
    kinds = {_KIND.get(p.suffix.lower(), p.suffix.lower()) for p in files}
    if len(kinds) > 1:
        found = sorted({p.suffix.lower() for p in files})
        raise DataError(
            Location(str(path)),
            f"the folder mixes data files of different kinds: {', '.join(found)}",
            expected="files of one kind (.json and .jsonl may be mixed)",
            fix="move the other files to their own folder",
        )
    return files


def iter_records(
    path: str | Path,
    *,
    file_format: str | None = None,
    show_progress: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Record]:
    """Stream the records of a file or folder; ``stats`` (if given) is filled when iteration ends."""
    path = Path(path)
    if file_format is not None and file_format not in _READERS:
        raise DataError(
            Location(str(path)),
            f"unknown file format {file_format!r}",
            expected=f"one of {', '.join(_READERS)}",
        )
    files = list_data_files(path)
    sizes = [p.stat().st_size for p in files]
    meter = _Meter(str(path), sum(sizes), show_progress)
    finished = False
    try:
        for file, size in zip(files, sizes):
            fmt = file_format or detect_file_format(file)
            rows_before = meter.rows
            try:
                for record in _READERS[fmt](file, meter.tick):
                    meter.rows += 1
                    yield record
            except OSError as e:
                raise DataError(Location(str(file)), f"cannot read the file: {e.strerror or e}") from None
            if meter.rows == rows_before:
                raise no_records(file, fmt)
            meter.file_done(size)
        finished = True
    finally:
        meter.close(stats, summary=finished)


class _Meter:
    """Counts rows and bytes over one or more files; draws a tqdm bar on stderr when asked."""

    def __init__(self, label: str, total: int, show: bool) -> None:
        self.label, self.rows, self.base, self.done = label, 0, 0, 0
        self.start = self.last_postfix = time.perf_counter()
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=Path(label).name,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def tick(self, position: int) -> None:
        """Called by readers with the byte position reached in the current file."""
        done = self.base + position
        if self.bar is not None and done > self.done:
            now = time.perf_counter()
            if now - self.last_postfix > 0.25:
                rate = self.rows / max(now - self.start, 1e-9)
                self.bar.set_postfix_str(f"{self.rows:,} rows, {rate:,.0f} rows/s", refresh=False)
                self.last_postfix = now
            self.bar.update(done - self.done)
        self.done = max(self.done, done)

    def file_done(self, size: int) -> None:
        self.base += size
        self.tick(0)

    def close(self, stats: ReadStats | None, summary: bool) -> None:
        seconds = time.perf_counter() - self.start
        if stats is not None:
            stats.rows, stats.bytes, stats.seconds = self.rows, self.done, seconds
        if self.bar is not None:
            rate = self.rows / seconds if seconds > 0 else 0.0
            self.bar.set_postfix_str(f"{self.rows:,} rows, {rate:,.0f} rows/s", refresh=False)
            self.bar.close()
            if summary:
                print(
                    f"read {self.rows:,} rows from {self.label} in {seconds:.2f} s ({rate:,.0f} rows/s)",
                    file=sys.stderr,
                )
