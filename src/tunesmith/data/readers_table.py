"""Streaming readers for csv, txt, parquet and arrow files."""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith.data.readers_common import Tick, utf8_error
from tunesmith.data.types import Record
from tunesmith.errors import DataError, Location

if TYPE_CHECKING:
    import pyarrow as pa

_TICK_EVERY = 256
_ARROW_ROWS = 1024  # rows turned into Python dicts at a time (bounds memory for wide/long rows)


def read_txt(path: Path, tick: Tick) -> Iterator[Record]:
    """Each non-empty line is one record {"text": line} (the line break removed)."""
    file, index, offset = str(path), 0, 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[3:], start + 3
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise utf8_error(path, lineno, start + e.start) from None
            if not text.strip():
                continue
            yield Record({"text": text}, Location(file, lineno, index))
            index += 1
            if index % _TICK_EVERY == 0:
                tick(offset)
    tick(offset)


def read_csv(path: Path, tick: Tick) -> Iterator[Record]:
    """A header row names the columns; every other row must have as many fields. Values are strings."""
    file = str(path)
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        rows = csv.reader(text)
        try:
            header = next(rows, None)
            if header is None:
                return
            if len(set(header)) != len(header):
                dupes = sorted({h for h in header if header.count(h) > 1})
                raise DataError(
                    Location(file, 1),
                    f"duplicate column names {dupes} in the header",
                    expected="unique column names",
                )
            index, last_line = 0, rows.line_num
            for row in rows:
                line, last_line = last_line + 1, rows.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        Location(file, line, index),
                        f"row has {len(row)} field(s) but the header has {len(header)} ({', '.join(header)})",
                        expected=f"{len(header)} comma-separated fields per row",
                        fix="quote fields that contain commas, quotes or line breaks",
                    )
                yield Record(dict(zip(header, row)), Location(file, line, index))
                index += 1
                if index % _TICK_EVERY == 0:
                    tick(raw.tell())
        except UnicodeDecodeError:
            raise utf8_error(path) from None
        except csv.Error as e:
            raise DataError(
                Location(file, rows.line_num),
                f"malformed CSV: {e}",
                expected="RFC 4180 CSV with a header row",
                fix="for very long or multi-line texts, convert the data to JSON Lines",
            ) from None
        tick(raw.tell())


def read_parquet(path: Path, tick: Tick) -> Iterator[Record]:
    """Row groups are streamed in small batches and turned into dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            Location(file), f"not a readable Parquet file: {e}", expected="a Parquet file"
        ) from None
    total, size, index = max(pf.metadata.num_rows, 1), path.stat().st_size, 0
    try:
        for batch in pf.iter_batches(batch_size=_ARROW_ROWS):
            for data in batch.to_pylist():
                yield Record(data, Location(file, None, index))
                index += 1
            tick(size * index // total)
    except pa.ArrowException as e:
        raise DataError(
            Location(file, None, index), f"cannot read Parquet data: {e}", expected="an intact Parquet file"
        ) from None


def read_arrow(path: Path, tick: Tick) -> Iterator[Record]:
    """An Arrow IPC file or stream (what ``datasets.save_to_disk`` writes), batch by batch."""
    import pyarrow as pa

    file, index = str(path), 0
    with pa.memory_map(str(path)) as source:
        try:
            for batch, position in _ipc_batches(source):
                for start in range(0, batch.num_rows, _ARROW_ROWS):
                    for data in batch.slice(start, _ARROW_ROWS).to_pylist():
                        yield Record(data, Location(file, None, index))
                        index += 1
                tick(position)
        except pa.ArrowException as e:
            raise DataError(
                Location(file, None, index),
                f"not a readable Arrow IPC file or stream: {e}",
                expected="an Arrow IPC file or stream (.arrow)",
            ) from None


def _ipc_batches(source: pa.MemoryMappedFile) -> Iterator[tuple[pa.RecordBatch, int]]:
    """(batch, approximate byte position) pairs of an IPC file, else of an IPC stream."""
    import pyarrow as pa

    size = source.size()
    try:
        reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        for batch in pa.ipc.open_stream(source):
            yield batch, source.tell()
        return
    n = reader.num_record_batches
    for i in range(n):
        yield reader.get_batch(i), size * (i + 1) // n
