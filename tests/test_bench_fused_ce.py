"""bench/fused_ce_gpu_check.py's CPU smoke: both head precisions match the plain path; the chunk sweep runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_smoke_guards_both_precisions_and_sweeps_chunks(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "fused_ce_gpu_check.py"), "--cpu-smoke", "--iters", "1",
           "--chunk-rows", "64", "128", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["guard"] == "PASS"
    for side in ("fp32", "autocast"):
        assert d[side]["grad_w_dtype"] == "torch.float32" and d[side]["grad_w_rel"] < 2e-2
    assert [(c["head"], c["chunk_rows"]) for c in d["chunk_sweep"]] == [
        ("trained", 64), ("frozen", 64), ("trained", 128), ("frozen", 128)]  # fmt: skip
