"""Where does a training step's time go on the GPU? Variants timed side by side, then one step profiled.

Qwen2.5-0.5B architecture (random init, bf16, the real Qwen2.5 tokenizer), LLaMA-Factory's alpaca_en_demo,
LoRA SFT. First one run of the first variant is profiled in-process: torch.profiler over optimizer steps
10..12 (the top operators by self CUDA time and by self CPU time, the GPU-busy share of the profiled wall
time: low = host-bound, and the Chrome trace), then cProfile over steps 14..18 (Python host time by
function). Then each variant runs through the real CLI for --steps steps; its steady seconds per optimizer
step and trained tokens/s (steps 10..end) come from trainer_log.jsonl.
Raw results: --out (JSON) and beside it the profiler tables (-by_cuda, -by_cpu, -py_tottime,
-py_cumulative .txt) and -trace.json.gz.

    python bench/profile_step_gpu.py --tokenizer .device/qwen-tok --data .device/alpaca_en_demo.json --out R.json
    torchrun --nproc-per-node 2 bench/profile_step_gpu.py ... --variants full_neat_packing   # rank 0 of DDP
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from multi_gpu import cli_value  # bench/ is on sys.path when run as a script
from train_gpu_smoke import build_model, device, versions

REPO = Path(__file__).resolve().parent.parent
BASE = {
    "stage": "sft", "do_train": True, "template": "qwen", "cutoff_len": 1024, "overwrite_output_dir": True,
    "per_device_train_batch_size": 8, "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no",
    "plot_loss": False, "bf16": True, "report_to": "none", "finetuning_type": "lora", "lora_target": "all",
    "lora_rank": 8, "seed": 0,
}  # fmt: skip
VARIANTS = {
    "default": {},  # on a GPU, flash_attn: auto is varlen here (padding-free rows)
    "default_sdpa": {"flash_attn": "sdpa"},  # the default before varlen: padded rows
    "default_compile": {"torch_compile": True},
    "no_grad_ckpt": {"disable_gradient_checkpointing": True},
    "packing": {"packing": True},
    "packing_no_ckpt": {"packing": True, "disable_gradient_checkpointing": True},
    "pure_bf16": {"pure_bf16": True},
    # the train_throughput "best" shape (with --cutoff-len 2048): is the compiled step still host-bound?
    "neat_packing": {"packing": True, "neat_packing": True},
    "neat_packing_compile": {"packing": True, "neat_packing": True, "torch_compile": True},
    "neat_packing_no_ckpt": {"packing": True, "neat_packing": True, "disable_gradient_checkpointing": True},
    "neat_packing_flex_compile": {
        "packing": True,
        "neat_packing": True,
        "flash_attn": "flex",
        "torch_compile": True,
    },
    "neat_packing_varlen": {"packing": True, "neat_packing": True, "flash_attn": "varlen"},
    # full SFT, e.g. to profile rank 0 of a 2-GPU DDP step (run this script under torchrun)
    "full_neat_packing": {
        "finetuning_type": "full",
        "learning_rate": 1e-5,
        "packing": True,
        "neat_packing": True,
    },
    # the train_throughput full-SFT best (Llama-3.2-1B: --model <its folder> --set template=llama3)
    "full_neat_packing_compile": {
        "finetuning_type": "full",
        "learning_rate": 1e-5,
        "packing": True,
        "neat_packing": True,
        "torch_compile": True,
    },
    "neat_packing_varlen_compile": {
        "packing": True,
        "neat_packing": True,
        "flash_attn": "varlen",
        "torch_compile": True,
    },
}


def steady(log: Path, warm: int = 10) -> dict:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("loss") is not None]
    later = [r for r in rows if r["step"] >= warm]
    if len(later) < 2:
        return {}
    dt = later[-1]["elapsed_s"] - later[0]["elapsed_s"]
    steps = later[-1]["step"] - later[0]["step"]
    return {
        "s_per_step": round(dt / steps, 4),
        "tokens_per_s": round((later[-1]["tokens_seen"] - later[0]["tokens_seen"]) / dt, 1),
        "tokens_per_step": round((later[-1]["tokens_seen"] - later[0]["tokens_seen"]) / steps, 1),
        "peak_mem_gib": max(r.get("peak_mem_gib") or 0 for r in rows),
        "final_loss": rows[-1]["loss"],
    }


def run_variant(name: str, extra: dict, a: argparse.Namespace, model: Path) -> dict:
    out = a.work / f"out-{name}"
    cfg = {**BASE, **extra, "model_name_or_path": str(model), "dataset": str(a.data), "output_dir": str(out),
           "max_steps": a.steps, "data_cache_dir": str(a.work / "cache"), **a.shape, **a.sets}  # fmt: skip
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *args], env=env,
                          capture_output=True, text=True)  # fmt: skip
    res = {
        "name": name,
        "overrides": extra,
        "exit_code": proc.returncode,
        "wall_s": round(time.time() - t0, 1),
    }
    if proc.returncode:
        res["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return res
    return {**res, **steady(out / "trainer_log.jsonl")}


KERNEL_GROUPS = (  # first match wins; names of CUDA kernels as the profiler records them
    ("attention", ("fmha", "attention", "flash")),
    ("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("triton (compiled layers)", ("triton",)),
    ("reduction", ("reduce", "logsumexp")),
    ("copy / memset", ("memcpy", "memset", "copy_kernel")),
)


GAP_US = 20.0  # GPU idle shorter than this is launch latency, not host work


def idle_gaps(kernels: list[dict]) -> list[tuple[float, float]]:
    """(start, end) of every stretch where no kernel of ``kernels`` (sorted by start) runs, in trace µs."""
    gaps, busy_until = [], kernels[0]["ts"]
    for e in kernels:
        if e["ts"] > busy_until:
            gaps.append((busy_until, e["ts"]))
        busy_until = max(busy_until, e["ts"] + e["dur"])
    return gaps


def host_during_idle(events: list[dict], gaps: list[tuple[float, float]], top: int = 25) -> dict:
    """What the training thread's Python was doing while the GPU idled (a trace recorded with_stack).

    Each idle gap of GPU work is charged to the Python frames running on the training thread (the thread of
    the outermost trainer frame, `_inner_training_loop`) at the gap's midpoint: `innermost` to the deepest frame
    there, `below_loop` to the chain of up to three frames under the trainer's per-step loop (`_run_epoch`),
    which names the step's phase (clipping, the optimizer, zero_grad, logging, the next batch, the replay).
    Empty when the trace has no Python frames (recorded without with_stack)."""
    frames = [e for e in events if e.get("ph") == "X" and e.get("cat") == "python_function"]
    loop = [e for e in frames if e["name"].endswith("_inner_training_loop")]
    if not loop:
        return {}
    tid = loop[0]["tid"]
    frames = sorted((e for e in frames if e["tid"] == tid), key=lambda e: (e["ts"], -e["dur"]))
    gaps = [(start, end) for start, end in gaps if end - start >= GAP_US]
    innermost: dict[str, float] = {}
    below: dict[str, float] = {}
    charged = 0.0
    for start, end in gaps:
        mid = (start + end) / 2
        stack = [e for e in frames if e["ts"] <= mid < e["ts"] + e["dur"]]  # outer to inner (sorted by start)
        dur = end - start
        charged += dur
        leaf = stack[-1]["name"] if stack else "(no Python frame)"
        innermost[leaf] = innermost.get(leaf, 0.0) + dur
        names = [e["name"] for e in stack]
        at = next((i for i, n in enumerate(names) if n.endswith("_run_epoch")), None)
        if at is None:
            phase = "(outside the step loop)"
        else:
            phase = " > ".join(_short(n) for n in names[at + 1 : at + 4]) or "(the step loop itself)"
        below[phase] = below.get(phase, 0.0) + dur

    def table(d: dict[str, float]) -> dict[str, float]:
        return {k: round(v / 1e3, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}

    return {"gaps": len(gaps), "idle_ms": round(charged / 1e3, 3), "below_loop_ms": table(below),
            "innermost_ms": table(innermost)}  # fmt: skip


def _short(frame: str) -> str:
    """'…/site-packages/transformers/trainer.py(1951): _run_epoch' -> 'trainer.py:_run_epoch'."""
    where, _, fn = frame.partition(": ")
    return f"{Path(where.split('(')[0]).name}:{fn}" if fn else frame


def summarize_trace(path: Path) -> dict:
    """GPU time by kernel group, and the GPU's idle time, over a Chrome trace (torch.profiler export)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    groups: dict[str, float] = {}
    for e in kernels:
        name = e["name"].lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other elementwise")
        groups[group] = groups.get(group, 0.0) + e["dur"]
    gaps = idle_gaps(kernels) if kernels else []
    busy = sum(groups.values())
    return {
        **({"host_during_idle": host_during_idle(events, gaps)} if kernels else {}),
        "kernels": len(kernels),
        "span_ms": round((max(e["ts"] + e["dur"] for e in kernels) - kernels[0]["ts"]) / 1e3, 3)
        if kernels
        else 0.0,
        "kernel_ms": round(busy / 1e3, 3),
        "idle_ms": round(sum(end - start for start, end in gaps) / 1e3, 3),
        "by_group_ms": {g: round(v / 1e3, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "by_group_share": {g: round(v / busy, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
    }


def profile(a: argparse.Namespace, model: Path, extra: dict, write: bool = True) -> dict:
    """Profile one in-process run of ``extra``; ``write``: this process writes the tables and the trace
    (under torchrun, rank 0 only; every rank trains)."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, schedule

    from tunesmith import load_config, run

    out = a.work / "out-profile"
    cfg = {**BASE, **extra, "model_name_or_path": str(model), "dataset": str(a.data), "output_dir": str(out),
           "max_steps": 20, "data_cache_dir": str(a.work / "cache"), **a.shape, **a.sets}  # fmt: skip
    prof = torch.profiler.profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        with_stack=a.stack,
        schedule=schedule(wait=8, warmup=2, active=3),
    )
    marks: list[float] = []
    py_prof = cProfile.Profile()

    def step_hook(*_args: object) -> None:
        marks.append(time.perf_counter())
        prof.step()
        # Python-level host time over optimizer steps 14..18, after the torch profiler has stopped.
        if len(marks) == 13:
            py_prof.enable()
        elif len(marks) == 18:
            py_prof.disable()

    # Bench-only: a global optimizer hook advances the profiler schedule once per optimizer step.
    handle = register_optimizer_step_post_hook(step_hook)
    prof.start()
    try:
        run(
            load_config(None, [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in cfg.items()])
        )
    finally:
        prof.stop()
        handle.remove()
    if not write:
        return {}
    stem = a.out.parent / a.out.stem
    trace = Path(str(stem) + "-trace.json.gz")
    prof.export_chrome_trace(str(trace))
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(py_prof, stream=buf).sort_stats(key).print_stats(60)
        Path(str(stem) + f"-py_{key}.txt").write_text(buf.getvalue())
    events = prof.key_averages()
    by_cuda = events.table(sort_by="self_cuda_time_total", row_limit=30)
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=30)
    (a.out.parent / (a.out.stem + "-by_cuda.txt")).write_text(by_cuda)
    (a.out.parent / (a.out.stem + "-by_cpu.txt")).write_text(by_cpu)
    cuda_us = sum(e.self_device_time_total for e in events if not e.key.startswith("ProfilerStep"))
    wall_s = marks[12] - marks[9] if len(marks) > 12 else None  # the 3 active steps
    py_wall_s = marks[17] - marks[12] if len(marks) > 17 else None  # the 5 steps under cProfile
    return {
        "profiled_steps": 3,
        "wall_s": None if wall_s is None else round(wall_s, 4),
        "gpu_busy_s": round(cuda_us / 1e6, 4),
        "gpu_busy_share": None if not wall_s else round(cuda_us / 1e6 / wall_s, 3),
        "cprofile_steps": 5,
        "cprofile_wall_s": None if py_wall_s is None else round(py_wall_s, 4),
        "unprofiled_s_per_step": round((marks[-1] - marks[-3]) / 2, 4) if len(marks) > 19 else None,
        "trace": summarize_trace(trace),
        "top_cuda": by_cuda.splitlines()[:20],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--stack", action="store_true", help="record Python frames: the trace summary says what the host did "
        "while the GPU idled (host_during_idle); the frames slow the profiled steps' host"
    )  # fmt: skip
    p.add_argument("--cutoff-len", type=int, default=BASE["cutoff_len"])
    p.add_argument("--batch", type=int, default=BASE["per_device_train_batch_size"])
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-profile-step"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--summarize-trace", type=Path, default=None, help="only summarize this trace into --out")
    p.add_argument(
        "--model", type=Path, default=None, help="an existing model folder (default: build Qwen2.5-0.5B)"
    )
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="for every run"
    )
    a = p.parse_args()
    pairs = [item.partition("=") for item in a.sets]
    if any(not eq or not key for key, eq, _ in pairs):
        p.error(f"--set takes KEY=VALUE, got {a.sets}")
    a.sets = {key: cli_value(raw) for key, _, raw in pairs}
    if a.summarize_trace:
        a.out.write_text(
            json.dumps({"trace": str(a.summarize_trace.name), **summarize_trace(a.summarize_trace)}, indent=1)
        )
        return 0
    if a.tokenizer is None or a.data is None:
        p.error("--tokenizer and --data are required (except with --summarize-trace)")
    a.shape = {"cutoff_len": a.cutoff_len, "per_device_train_batch_size": a.batch}
    # Under torchrun every rank trains the profiled run (DDP, say) and rank 0 writes; the variants, which
    # run the CLI in child processes, are skipped there.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        a.work = a.work / f"rank{rank}"
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    model = a.model or build_model(a.work / "model", a.tokenizer)
    results: dict = {"bench": "profile_step_gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "device": device(), "versions": versions(), "base": BASE | a.shape | a.sets, "world_size": world,
                     "data": a.data.name,
                     "variants": []}  # fmt: skip
    if not a.no_profile:  # first: a call cut short by its time limit still brings the profile back
        found = profile(a, model, VARIANTS[a.variants[0]], write=rank == 0)
        if rank != 0:
            return 0
        results["profile"] = {"variant": a.variants[0], **found}
        a.out.write_text(json.dumps(results, indent=1))
        print("\n".join(results["profile"].pop("top_cuda")), flush=True)
        print(json.dumps(results["profile"]), flush=True)
    for name in a.variants if world == 1 else ():
        results["variants"].append(run_variant(name, VARIANTS[name], a, model))
        a.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["variants"][-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
