"""Where does a training step's time go on the GPU? Variants timed side by side, then one step profiled.

Qwen2.5-0.5B architecture (random init, bf16, the real Qwen2.5 tokenizer), LLaMA-Factory's alpaca_en_demo,
LoRA SFT. Each variant runs through the real CLI for --steps steps; its steady seconds per optimizer step
and trained tokens/s (steps 10..end) come from trainer_log.jsonl. Then one run of the first variant is
profiled in-process with torch.profiler over 3 optimizer steps: the top operators by self CUDA time and by
self CPU time, and the GPU-busy share of the profiled wall time (low = host-bound).
Raw results: --out (JSON) and the profiler tables beside it.

    python bench/profile_step_gpu.py --tokenizer .device/qwen-tok --data .device/alpaca_en_demo.json --out R.json
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

from train_gpu_smoke import build_model, device, versions  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
BASE = {
    "stage": "sft", "do_train": True, "template": "qwen", "cutoff_len": 1024, "overwrite_output_dir": True,
    "per_device_train_batch_size": 8, "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no",
    "plot_loss": False, "bf16": True, "report_to": "none", "finetuning_type": "lora", "lora_target": "all",
    "lora_rank": 8, "seed": 0,
}  # fmt: skip
VARIANTS = {
    "default": {},
    "no_grad_ckpt": {"disable_gradient_checkpointing": True},
    "packing": {"packing": True},
    "packing_no_ckpt": {"packing": True, "disable_gradient_checkpointing": True},
    "pure_bf16": {"pure_bf16": True},
    # the train_throughput "best" shape (with --cutoff-len 2048): is the compiled step still host-bound?
    "neat_packing": {"packing": True, "neat_packing": True},
    "neat_packing_compile": {"packing": True, "neat_packing": True, "torch_compile": True},
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
           "max_steps": a.steps, "data_cache_dir": str(a.work / "cache"), **a.shape}  # fmt: skip
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


def profile(a: argparse.Namespace, model: Path, extra: dict) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, schedule

    from tunesmith import load_config, run

    out = a.work / "out-profile"
    cfg = {**BASE, **extra, "model_name_or_path": str(model), "dataset": str(a.data), "output_dir": str(out),
           "max_steps": 16, "data_cache_dir": str(a.work / "cache"), **a.shape}  # fmt: skip
    prof = torch.profiler.profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=8, warmup=2, active=3),
    )
    marks: list[float] = []

    def step_hook(*_args: object) -> None:
        marks.append(time.perf_counter())
        prof.step()

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
    events = prof.key_averages()
    by_cuda = events.table(sort_by="self_cuda_time_total", row_limit=30)
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=30)
    (a.out.parent / (a.out.stem + "-by_cuda.txt")).write_text(by_cuda)
    (a.out.parent / (a.out.stem + "-by_cpu.txt")).write_text(by_cpu)
    cuda_us = sum(e.self_device_time_total for e in events if not e.key.startswith("ProfilerStep"))
    wall_s = marks[12] - marks[9] if len(marks) > 12 else None  # the 3 active steps
    return {
        "profiled_steps": 3,
        "wall_s": None if wall_s is None else round(wall_s, 4),
        "gpu_busy_s": round(cuda_us / 1e6, 4),
        "gpu_busy_share": None if not wall_s else round(cuda_us / 1e6 / wall_s, 3),
        "top_cuda": by_cuda.splitlines()[:20],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--cutoff-len", type=int, default=BASE["cutoff_len"])
    p.add_argument("--batch", type=int, default=BASE["per_device_train_batch_size"])
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-profile-step"))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.shape = {"cutoff_len": a.cutoff_len, "per_device_train_batch_size": a.batch}
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(a.work / "model", a.tokenizer)
    results: dict = {"bench": "profile_step_gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "device": device(), "versions": versions(), "base": BASE | a.shape, "variants": []}  # fmt: skip
    for name in a.variants:
        results["variants"].append(run_variant(name, VARIANTS[name], a, model))
        a.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["variants"][-1]), flush=True)
    if not a.no_profile:
        results["profile"] = profile(a, model, VARIANTS[a.variants[0]])
        a.out.write_text(json.dumps(results, indent=1))
        print("\n".join(results["profile"].pop("top_cuda")), flush=True)
        print(json.dumps(results["profile"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
