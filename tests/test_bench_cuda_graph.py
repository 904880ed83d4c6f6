"""bench/cuda_graph_step.py's CPU smoke: the GPU experiment's step (PEFT LoRA, varlen attention, fused loss
head, AdamW) runs eager and compiled, each in its own process, with the same loss and gradients; a variant
whose process dies is reported (exit 2) with the results of the others kept; the CUDA graph variants are
refused without a GPU rather than skipped silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import cuda_graph_step as cgs  # noqa: E402

SCRIPT = str(REPO / "bench" / "cuda_graph_step.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _run(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "g.json"
    cmd = [sys.executable, SCRIPT, "--cpu-smoke", "--steps", "2", "--warmup", "1", "--out", str(out), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout), out


# slow (about 90 s of inductor on 2 cores): the compiled layers and head it runs are the library's, covered by
# tests/training/test_compile.py (a compiled LoRA run against eager) and test_fused_ce_chunk.py (compiled head)
@pytest.mark.slow
def test_cpu_smoke_compiled_step_matches_eager_and_writes_the_result(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "--variants", "eager", "compiled")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["mode"] == "cpu" and d["checks"]["pass"] and d["checks"]["failed_to_run"] == []
    eager, compiled = d["variants"]["eager"], d["variants"]["compiled"]
    assert eager["optimizer_steps"] == compiled["optimizer_steps"] == 4  # counted from AdamW's state
    # compiled for real: the second of the two layers (the first's input needs no gradient) and the head
    assert (eager["compiled_layers"], compiled["compiled_layers"]) == (0, 1)
    assert (eager["head_compile_backend"], compiled["head_compile_backend"]) == (None, "inductor")
    grads = d["checks"]["compiled"]["vs_eager"]["grad_rel_l2_diff"]
    assert len(grads) == 2 and max(grads.values()) <= 1e-4
    assert eager["last_loss"] < eager["first_loss"]  # the steps trained
    batch = d["batch"]
    assert batch["trained_tokens"] < batch["tokens"] - batch["rows"]  # prompts masked, not only first labels


def test_a_variant_whose_process_dies_is_reported_and_the_rest_kept(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "--variants", "eager", "compiled", "--crash-variant", "compiled")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["checks"]["failed_to_run"] == ["compiled"]
    assert "exited with" in d["variants"]["compiled"]["error"]
    assert d["variants"]["eager"]["optimizer_steps"] == 4 and "compiled" not in d["speedup_vs_eager"]


def test_graph_variants_are_refused_without_a_gpu(tmp_path: Path) -> None:
    proc, out = _run(tmp_path, "--variants", "eager_graph", timeout=120)
    assert proc.returncode != 0 and "CUDA graphs need a GPU" in proc.stderr
    assert not out.exists()


def test_a_graph_variant_must_match_its_twin_after_the_last_step_too() -> None:
    """Against eager a compiled variant may drift in bf16; against its twin without the graph a replay may not:
    a replay that trains differently from step 2 on fails even with step 1 equal."""
    g = {"a": torch.ones(4), "b": torch.full((4,), 2.0)}
    run = {"first_loss": 5.0, "last_loss": 4.0, "ms_per_step": 1.0}
    results = {
        "eager": dict(run),
        "compiled": run | {"last_loss": 4.02},
        "compiled_graph": run | {"last_loss": 4.02},
    }
    grads = {name: g for name in results}
    checks = cgs.compare(results, grads, cgs.TOLERANCE["gpu"])
    assert (
        checks["compiled"]["pass"] and checks["compiled_graph"]["pass"]
    )  # 0.5% from eager: information only
    results["compiled_graph"]["last_loss"] = 4.2  # the replays trained differently from the twin
    checks = cgs.compare(results, grads, cgs.TOLERANCE["gpu"])
    assert not checks["compiled_graph"]["vs_compiled"]["pass"] and not checks["compiled_graph"]["pass"]
    grads["eager_graph"] = {"a": torch.ones(4), "b": torch.full((4,), 2.5)}  # gradients off by 25%
    results["eager_graph"] = dict(run)
    checks = cgs.compare(results, grads, cgs.TOLERANCE["gpu"])
    assert not checks["eager_graph"]["vs_eager"]["pass"] and not checks["eager_graph"]["pass"]
    results["compiled_graph_inplace"] = run | {
        "last_loss": 4.3
    }  # in-place accumulation checked against its twin
    grads["compiled_graph_inplace"] = g
    checks = cgs.compare(results, grads, cgs.TOLERANCE["gpu"])
    assert not checks["compiled_graph_inplace"]["vs_compiled"]["pass"]


def test_mixed_fused_lora_variant_runs_and_matches_eager(tmp_path: Path) -> None:
    """--mixed (autocast, as the trainer) with the fused LoRA layers: on the fp32 CPU smoke model they take
    PEFT's path (the base is not in the autocast dtype), so the numbers match eager's."""
    proc, out = _run(tmp_path, "--mixed", "--variants", "eager", "eager_fusedlora")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert "--mixed" in d["model"] and d["checks"]["pass"]
    assert d["variants"]["eager_fusedlora"]["optimizer_steps"] == 4


def test_fused_layer_variants_run_the_librarys_swaps_and_match_eager(tmp_path: Path) -> None:
    """The `_fusednorm` / `_fusedlayers` variants: the library's RMSNorm and SwiGLU swaps (model/fused_norm.py,
    model/fused_layers.py), the same numbers as eager (fp32 CPU smoke: up to the reduction's order)."""
    proc, out = _run(
        tmp_path, "--variants", "eager", "eager_fusedlora_fusednorm", "eager_fusedlora_fusedlayers"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["checks"]["pass"], d["checks"]
    assert not d["checks"]["failed_to_run"]
