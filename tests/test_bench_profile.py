"""bench/profile_step_gpu.py's trace summary: GPU time by kernel group and the GPU's idle gaps."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import profile_step_gpu as psg  # noqa: E402


def test_trace_summary_groups_kernels_and_counts_idle_gaps(tmp_path: Path) -> None:
    def kernel(name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [
        kernel("fmha_cutlassF_bf16_aligned", 0, 400),
        kernel("nvjet_sm90_tst_192x192", 400, 300),  # back to back: no gap
        kernel("triton_poi_fused_add_mul_silu_0", 1000, 100),  # 300 us idle before it
        kernel("void at::native::vectorized_elementwise_kernel<exp>", 1050, 100),  # overlaps: no gap
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # host side: ignored
    ]
    path = tmp_path / "t-trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = psg.summarize_trace(path)
    assert s["kernels"] == 4 and s["span_ms"] == 1.15 and s["idle_ms"] == 0.3
    assert s["by_group_ms"] == {
        "attention": 0.4,
        "gemm": 0.3,
        "triton (compiled layers)": 0.1,
        "other elementwise": 0.1,
    }
    assert list(s["by_group_share"])[0] == "attention" and s["by_group_share"]["attention"] == 0.444
