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


def test_profile_under_torchrun_trains_every_rank_and_rank0_writes(tmp_path: Path) -> None:
    """Two gloo processes on CPU: a DDP full-SFT run profiled, the results and tables from rank 0 only."""
    import os
    import socket
    import subprocess

    from tests.training.helpers import write_sft_data
    from tunesmith.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    data = write_sft_data(tmp_path / "sft.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "res" / "p.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(REPO / "bench" / "profile_step_gpu.py"), "--tokenizer", str(model), "--data", str(data),
           "--model", str(model), "--variants", "full_neat_packing", "--cutoff-len", "64", "--batch", "2",
           "--work", str(tmp_path / "work"), "--out", str(out), "--set", "bf16=false",
           "--set", "template=qwen"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed run: world size 2" in proc.stdout + proc.stderr
    d = json.loads(out.read_text())
    assert d["world_size"] == 2 and d["variants"] == [] and d["profile"]["variant"] == "full_neat_packing"
    assert d["profile"]["cprofile_wall_s"] and d["profile"]["trace"]["span_ms"] >= 0
    assert (out.parent / "p-by_cpu.txt").exists() and (out.parent / "p-py_tottime.txt").exists()
    assert (tmp_path / "work" / "rank0" / "out-profile" / "trainer_log.jsonl").exists()


def test_idle_gaps_are_charged_to_the_training_threads_python_frames(tmp_path: Path) -> None:
    def kernel(ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": "nvjet_sm90", "ts": ts, "dur": dur, "tid": 7}

    def frame(name: str, ts: float, dur: float, tid: int = 1) -> dict:
        return {"ph": "X", "cat": "python_function", "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [
        frame("transformers/trainer.py(1500): _inner_training_loop", 0, 10_000),
        frame("transformers/trainer.py(1851): _run_epoch", 0, 10_000),
        frame("torch/nn/modules/module.py(2948): zero_grad", 1_000, 1_000),
        frame("torch/nn/modules/module.py(2665): parameters", 1_100, 800),
        frame("transformers/trainer.py(2289): get_batch_samples", 3_000, 500),
        frame("torch/utils/data/dataloader.py(700): __next__", 3_000, 500, tid=2),  # another thread: ignored
        kernel(0, 1_000),
        kernel(2_000, 1_000),  # idle 1000..2000: in zero_grad > parameters
        kernel(3_010, 100),  # a 10 us gap: launch latency, not charged
        kernel(4_000, 100),  # idle 3110..4000: its midpoint is after get_batch_samples (3000..3500)
        kernel(4_100, 100),
    ]
    path = tmp_path / "t-trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = psg.summarize_trace(path)["host_during_idle"]
    assert s["gaps"] == 2 and s["idle_ms"] == 1.89
    assert s["below_loop_ms"] == {
        "module.py:zero_grad > module.py:parameters": 1.0,
        "(the step loop itself)": 0.89,
    }
    assert s["innermost_ms"] == {
        "torch/nn/modules/module.py(2665): parameters": 1.0,
        "transformers/trainer.py(1851): _run_epoch": 0.89,
    }
    events = [e for e in events if e["cat"] != "python_function"]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert psg.summarize_trace(path)["host_during_idle"] == {}
