"""bench/cuda_graph_step.py's CPU smoke: the GPU experiment's step (PEFT LoRA, varlen attention, fused loss
head, AdamW) runs eager and compiled with the same loss and gradients, and writes its result; the CUDA graph
variants are refused without a GPU rather than skipped silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "bench" / "cuda_graph_step.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_cpu_smoke_compiled_step_matches_eager_and_writes_the_result(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    cmd = [sys.executable, SCRIPT, "--cpu-smoke", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["mode"] == "cpu" and d["checks"]["pass"]
    assert set(d["variants"]) == {"eager", "compiled"}
    assert all("error" not in r and r["optimizer_steps"] == 4 for r in d["variants"].values())
    grads = d["checks"]["compiled"]["grad_rel_l2_diff"]
    assert len(grads) == 2 and max(grads.values()) <= 1e-4
    assert d["variants"]["eager"]["last_loss"] < d["variants"]["eager"]["first_loss"]  # the steps trained
    assert d["batch"]["trained_tokens"] < d["batch"]["tokens"]  # prompts are masked


def test_graph_variants_are_refused_without_a_gpu(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        SCRIPT,
        "--cpu-smoke",
        "--variants",
        "eager_graph",
        "--out",
        str(tmp_path / "g.json"),
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CUDA graphs need a GPU" in proc.stderr
    assert not (tmp_path / "g.json").exists()
