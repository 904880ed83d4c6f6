"""bench/varlen_gpu_check.py's CPU smoke: varlen (its per-document reference on CPU) = SDPA on packed rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_smoke_matches_sdpa_and_writes_the_result(tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(REPO / "bench" / "varlen_gpu_check.py"),
        "--cpu-smoke",
        "--iters",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["mode"] == "cpu" and d["checks"]["pass"]
    assert d["batch"]["documents"] > d["batch"]["rows"]  # several documents a row: boundaries matter
    assert d["checks"]["loss_rel_diff"] <= 1e-5 and max(d["checks"]["grad_rel_l2_diff"].values()) <= 1e-4
    assert d["ms_per_fwd_bwd"]["sdpa"] > 0 and d["ms_per_fwd_bwd"]["varlen"] > 0
