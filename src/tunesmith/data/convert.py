"""Dataset spec -> canonical rows stored on disk (Arrow, one JSON text per row), cached by content.

Rows are kept as JSON text so that mixed types across rows can never reach Arrow as a type error;
the file is memory-mapped, so converting a 10 GB dataset costs disk, not RAM.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import pyarrow as pa

from tunesmith.data.cache import DataCache, code_digest, files_digest, key_of
from tunesmith.data.load import BadRowPolicy, LoadReport, load_rows
from tunesmith.data.readers import list_data_files
from tunesmith.data.registry import DatasetSpec
from tunesmith.data.types import Row

ROWS_FILE = "rows.arrow"
_BATCH = 4096
_SCHEMA = pa.schema([("row", pa.large_string())])


@dataclass(frozen=True)
class Converted:
    """One dataset converted to canonical rows on disk."""

    name: str
    path: Path  # the Arrow file
    num_rows: int
    key: str
    report: str  # human summary of the load (valid / invalid rows per reason)
    invalid: int
    reused: bool


def _source_digest(spec: DatasetSpec, dataset_dir: str | Path) -> str:
    local = spec.local_path(dataset_dir)
    if local is not None:
        return files_digest(list_data_files(local))
    return key_of({"hub": spec.hf_hub_url, "subset": spec.subset, "split": spec.split})


def convert(
    spec: DatasetSpec,
    *,
    dataset_dir: str | Path,
    policy: BadRowPolicy,
    cache: DataCache,
    overwrite: bool = False,
    show_progress: bool = False,
    require_response: bool = True,
) -> Converted:
    """Read, validate and canonicalise one dataset (or reuse the cached result)."""
    key = key_of(
        {
            "spec": asdict(spec),
            "source": _source_digest(spec, dataset_dir),
            "policy": asdict(policy),
            "require_response": require_response,
            "code": code_digest(),
        }
    )
    hit = None if overwrite else cache.get("rows", key)
    if hit is not None:
        meta = orjson.loads((hit / "meta.json").read_bytes())
        return Converted(
            spec.name, hit / ROWS_FILE, meta["num_rows"], key, meta["report"], meta["invalid"], True
        )

    staging = cache.staging("rows")
    report = LoadReport(dataset=spec.name)
    n = 0
    with pa.OSFile(str(staging / ROWS_FILE), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        buf: list[str] = []
        for row in load_rows(
            spec,
            dataset_dir=dataset_dir,
            policy=policy,
            report=report,
            show_progress=show_progress,
            require_response=require_response,
        ):
            buf.append(orjson.dumps(row).decode())
            if len(buf) >= _BATCH:
                writer.write_batch(pa.record_batch([pa.array(buf, pa.large_string())], schema=_SCHEMA))
                n += len(buf)
                buf = []
        if buf:
            writer.write_batch(pa.record_batch([pa.array(buf, pa.large_string())], schema=_SCHEMA))
            n += len(buf)
    summary = report.summary()
    if show_progress and report.invalid_total:
        print(summary, file=sys.stderr)
    path = cache.commit(
        staging,
        "rows",
        key,
        {"num_rows": n, "report": summary, "invalid": report.invalid_total, "dataset": spec.name},
    )
    return Converted(spec.name, path / ROWS_FILE, n, key, summary, report.invalid_total, False)


class RowStore:
    """Random access to converted rows of one dataset (memory-mapped; decoded on demand)."""

    def __init__(self, path: Path) -> None:
        self._reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        self._col = self._reader.read_all().column("row")

    def __len__(self) -> int:
        return len(self._col)

    def get(self, indices: list[int]) -> list[Row]:
        taken = self._col.take(pa.array(indices, pa.int64())).to_pylist()
        return [orjson.loads(t) for t in taken]
