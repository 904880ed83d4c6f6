"""GPU memory of DPO with LoRA: the adapter-disabled policy as reference vs a separate reference model.

Both runs train LoRA DPO on the Qwen2.5-0.5B architecture (its published config, random weights, bf16) with
the real Qwen2.5 tokenizer on LLaMA-Factory's dpo_en_demo, through the real CLI in a child process each:
(a) ``adapter``: no ref_model, the reference is the policy with its adapter disabled (no second copy);
(b) ``ref_model``: ref_model = the same base folder, a second frozen copy of the weights.
Recorded per run: peak GPU memory (torch.cuda.max_memory_allocated, as trainer_log.jsonl's peak_mem_gib),
step time (median of the logged per-step times, steps >= 3, and train_runtime / steps), and the logged
rewards/margins and rewards/accuracies. Raw results: bench/results/dpo_gpu_memory-<UTC time>.json.

    python bench/dpo_gpu_memory.py --tokenizer .device/qwen-tok --data .device/dpo_en_demo.json [--steps 20]
    python bench/dpo_gpu_memory.py --cpu-smoke     # the tiny model on CPU, 3 steps: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu_smoke import build_model, device, versions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LF_DEMO = REPO.parent / "shared" / "compat" / "llamafactory-data" / "dpo_en_demo.json"
DATASET = "dpo_en_demo"
# LLaMA-Factory's dataset_info.json entry for dpo_en_demo
INFO = {
    DATASET: {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    }
}
REFERENCES = ("adapter", "ref_model")


def write_dataset_dir(data: Path, work: Path) -> Path:
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data, folder / "dpo_en_demo.json")
    (folder / "dataset_info.json").write_text(json.dumps(INFO, indent=1))
    return folder


def run_reference(kind: str, model: Path, data_dir: Path, work: Path, a: argparse.Namespace) -> dict:
    out = work / f"out-{kind}"
    overrides = {
        "model_name_or_path": str(model), "stage": "dpo", "do_train": True, "dataset": DATASET,
        "dataset_dir": str(data_dir), "template": "qwen", "cutoff_len": a.cutoff_len, "output_dir": str(out),
        "overwrite_output_dir": True, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8,
        "pref_beta": 0.1, "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1,
        "learning_rate": a.lr, "lr_scheduler_type": "constant", "max_steps": a.steps, "logging_steps": 1,
        "save_strategy": "no", "plot_loss": False, "data_cache_dir": str(work / "cache"), "seed": 0,
    }  # fmt: skip
    if not a.cpu_smoke:
        overrides["bf16"] = True
    if kind == "ref_model":
        overrides["ref_model"] = str(model)
    cmd = [sys.executable, "-m", "tunesmith.cli", "train", *[f"{k}={v}" for k, v in overrides.items()]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    result: dict = {"reference": kind, "overrides": overrides, "exit_code": proc.returncode}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-4000:]
        return result
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line]
    steps = [r for r in logs if r.get("loss") is not None and "rewards/margins" in r]
    times = [b["elapsed_s"] - a_["elapsed_s"] for a_, b in zip(steps, steps[1:]) if b["step"] >= 3]
    summary = next(r for r in logs if "train_runtime" in r)
    result.update(
        peak_mem_gib=max(r.get("peak_mem_gib") or 0 for r in logs),
        step_s_median=round(statistics.median(times), 4) if times else None,
        step_s_mean_incl_warmup=round(summary["train_runtime"] / len(steps), 4),
        steps=len(steps),
        first_loss=steps[0]["loss"],
        last_loss=steps[-1]["loss"],
        rewards_margins=[round(r["rewards/margins"], 5) for r in steps],
        rewards_accuracies=[round(r["rewards/accuracies"], 4) for r in steps],
        margins_last5_mean=round(sum(r["rewards/margins"] for r in steps[-5:]) / len(steps[-5:]), 5),
        accuracies_last5_mean=round(sum(r["rewards/accuracies"] for r in steps[-5:]) / len(steps[-5:]), 4),
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, default=REPO / ".device" / "qwen-tok", help="Qwen2.5 tokenizer")
    p.add_argument(
        "--data", type=Path, default=REPO / ".device" / "dpo_en_demo.json", help="dpo_en_demo.json"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--batch", type=int, default=4, help="pairs per step (each is a chosen and a rejected row)"
    )
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-dpo-gpu-memory"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, 3 steps (harness check)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.cpu_smoke:
        from tunesmith.tiny_model import build_tiny_model

        a.steps, a.batch, a.cutoff_len, a.lr = min(a.steps, 3), 2, 256, 1e-3
        model = build_tiny_model(a.work / "tiny-model")
        data = a.data if a.data.is_file() else LF_DEMO
        label = "tiny Qwen2 (tunesmith.tiny_model), fp32, CPU smoke"
    else:
        model = build_model(a.work / "qwen2.5-0.5b-random", a.tokenizer)
        data, label = a.data, "Qwen2.5-0.5B architecture, random init, bf16"
    data_dir = write_dataset_dir(data, a.work)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = {
        "bench": "dpo_gpu_memory", "date": date, "device": device(), "versions": versions(), "model": label,
        "data": data.name, "cpu_smoke": a.cpu_smoke,
        "note": "peak_mem_gib: torch.cuda.max_memory_allocated (on CPU: peak RSS); step_s_median over steps >= 3",
        "runs": [run_reference(kind, model, data_dir, a.work, a) for kind in REFERENCES],
    }  # fmt: skip
    ok = [r for r in results["runs"] if r["exit_code"] == 0]
    if len(ok) == 2:
        results["ref_model_extra_peak_gib"] = round(ok[1]["peak_mem_gib"] - ok[0]["peak_mem_gib"], 3)
    tag = "-cpu-smoke" if a.cpu_smoke else ""
    out = a.out or REPO / "bench" / "results" / f"dpo_gpu_memory{tag}-{date.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for r in results["runs"]:
        keep = (
            "reference",
            "exit_code",
            "peak_mem_gib",
            "step_s_median",
            "margins_last5_mean",
            "accuracies_last5_mean",
        )
        print(json.dumps({k: r.get(k) for k in keep}))
        if r.get("stderr_tail"):
            print(r["stderr_tail"], file=sys.stderr)
    print(f"wrote {out}")
    return 0 if len(ok) == len(REFERENCES) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
