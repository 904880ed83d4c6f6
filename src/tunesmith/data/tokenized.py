"""Tokenized datasets on disk: Arrow part files written by workers, read back memory-mapped."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

INT_COLUMNS = (
    "input_ids",
    "labels",
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "position_ids",
)


def write_part(path: Path, columns: dict[str, list[Any]]) -> int:
    """Write one part file; token columns become list<int32> so they map with no copy."""
    arrays, names = [], []
    for name, values in columns.items():
        if name in INT_COLUMNS:
            arrays.append(_int_lists(values))
        elif name == "weights":
            arrays.append(pa.array(values, pa.list_(pa.float32())))
        else:
            arrays.append(pa.array(values))
        names.append(name)
    table = pa.table(arrays, names=names)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return table.num_rows


def _int_lists(rows: list[list[int]]) -> pa.Array:
    """list<int32> from Python lists via one flat buffer and offsets (much cheaper than row by row)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


class TokenDataset:
    """A map-style dataset over tokenized part files (torch-free; the collator makes tensors)."""

    def __init__(self, parts: list[Path]) -> None:
        tables = [pa.ipc.open_file(pa.memory_map(str(p), "r")).read_all() for p in parts]
        tables = [t for t in tables if t.num_rows]
        # promote: the optional `weights` column exists only in parts where some weight != 1 (nulls elsewhere)
        self.table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
        self.parts = parts

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}

    def lengths(self, column: str = "input_ids") -> np.ndarray:
        """Token length of every row (for packing, length grouping and statistics)."""
        if column not in self.table.column_names:
            return np.zeros(len(self), dtype=np.int64)
        return np.asarray(
            pc.list_value_length(self.table.column(column)).to_numpy(zero_copy_only=False), dtype=np.int64
        )

    def supervised_tokens(self, column: str = "labels") -> int:
        """Tokens that carry a loss term (label != -100, the first token of a row excluded)."""
        if column not in self.table.column_names or not len(self):
            return 0
        flat = pc.list_flatten(pc.list_slice(self.table.column(column), 1))
        return int(pc.sum(pc.not_equal(flat, -100)).as_py() or 0)

    def trained_counts(self, rows: np.ndarray | None = None, column: str = "labels") -> np.ndarray:
        """Tokens that carry a loss term in each row (label != -100, the row's first token excluded, as
        `supervised_tokens` counts them): of every row, or of ``rows`` (indices) only, which reads only those."""
        n = len(self) if rows is None else len(rows)
        if column not in self.table.column_names or not n:
            return np.zeros(n, dtype=np.int64)
        labels = self.table.column(column)
        if rows is not None:
            labels = labels.take(pa.array(np.asarray(rows, dtype=np.int64)))
        labels = pc.list_slice(labels, 1)
        sizes = np.asarray(pc.list_value_length(labels).to_numpy(zero_copy_only=False), dtype=np.int64)
        flat = pc.not_equal(pc.list_flatten(labels), -100).to_numpy(zero_copy_only=False)
        cum = np.concatenate([[0], np.cumsum(flat, dtype=np.int64)])
        ends = np.cumsum(sizes)
        return cum[ends] - cum[ends - sizes]

    def num_tokens(self, column: str = "input_ids") -> int:
        return int(self.lengths(column).sum())
