"""A >= 200 MB JSON array and JSONL file stream in bounded memory, with progress, in a fresh process."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

TARGET_BYTES = 200 * 2**20
MAX_RSS_MB = 512  # the reader peaks near 50 MiB; loading the 200 MiB file whole would pass 1 GiB

# Iterates every record with progress on and reports rows, the last record's line, speed and peak RSS.
# ru_maxrss of a child starts at the parent's RSS at fork (Linux keeps it across exec), so VmHWM, this
# process's own peak (a new address space at exec), is reported too and is what the test bounds.
READ_SCRIPT = """
import json, re, resource, sys
from pathlib import Path
from tunesmith.data.readers import ReadStats, iter_records
stats, n, last = ReadStats(), 0, None
for rec in iter_records(sys.argv[1], show_progress=True, stats=stats):
    n += 1
    last = rec
print(json.dumps({"rows": n, "stats_rows": stats.rows, "rows_per_s": stats.rows_per_s,
                  "mb_per_s": stats.bytes / stats.seconds / 2**20, "seconds": stats.seconds,
                  "last_line": last.where.line, "last_keys": sorted(last.data),
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "vm_hwm_mb": int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024}))
"""


def templates(n: int = 48) -> list[dict]:
    """Alpaca-like records from ~60 bytes to ~30 KB, with escapes and non-ASCII text."""
    rng = random.Random(0)
    words = [
        "the",
        "model",
        "learns",
        "to",
        "answer",
        "about",
        "data",
        "数据",
        "训练",
        '"quoted"',
        "tab\t",
        "{",
        "}",
    ]
    out = []
    for i in range(n):
        size = int(10 ** rng.uniform(1, 3.7))
        out.append(
            {
                "instruction": " ".join(rng.choices(words, k=max(2, size // 8))),
                "input": "" if i % 3 else " ".join(rng.choices(words, k=size // 4)),
                "output": " ".join(rng.choices(words, k=size)),
            }
        )
    return out


def write_big(path: Path, array: bool) -> tuple[int, int]:
    """Write >= TARGET_BYTES of records by repeating one block of templates; (rows, last record's line)."""
    recs = templates()
    if array:  # half compact, half pretty-printed (LLaMA-Factory style), so records span many lines
        bodies = [json.dumps(r, ensure_ascii=False, indent=2 if i % 2 else None) for i, r in enumerate(recs)]
        block = ",\n".join(bodies).encode()
        block_lines = block.count(b"\n") + 1
        last_body_lines = bodies[-1].count("\n")
    else:
        block = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
    reps = -(-TARGET_BYTES // len(block))
    with path.open("wb", buffering=1 << 22) as f:
        if array:
            f.write(b"[\n")
            for i in range(reps):
                f.write(block if i == 0 else b",\n" + block)
            f.write(b"\n]\n")
        else:
            for _ in range(reps):
                f.write(block)
    rows = reps * len(recs)
    last_line = 1 + reps * block_lines - last_body_lines if array else rows
    return rows, last_line


@pytest.mark.parametrize("array", [True, False], ids=["json-array", "jsonl"])
def test_big_file_streams_in_bounded_memory(tmp_path, array):
    path = tmp_path / ("big.json" if array else "big.jsonl")
    rows, last_line = write_big(path, array)
    assert path.stat().st_size >= TARGET_BYTES
    proc = subprocess.run(
        [sys.executable, "-c", READ_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{path.name}: {path.stat().st_size / 2**20:.0f} MiB, {report}")
    assert report["rows"] == report["stats_rows"] == rows
    assert report["last_line"] == last_line
    assert report["last_keys"] == ["input", "instruction", "output"]
    # VmHWM is the reader's own peak; ru_maxrss also holds the RSS of the process that started it (a pytest
    # worker that has run many tests), so it is reported, not judged
    assert report["vm_hwm_mb"] < MAX_RSS_MB
    assert report["rows_per_s"] > 0
    assert "rows/s" in proc.stderr and "B/s" in proc.stderr  # the tqdm bar over bytes
    assert f"read {rows:,} rows from {path} in " in proc.stderr
