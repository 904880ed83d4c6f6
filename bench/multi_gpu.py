"""Multi-GPU benchmark of `tunesmith train`: DDP, DeepSpeed ZeRO-2/ZeRO-3 and FSDP2, 2 GPUs against 1.

For LoRA and full SFT of the Qwen2.5-0.5B architecture (random init, bf16, the real Qwen2.5 tokenizer,
LLaMA-Factory's alpaca_en_demo), each engine trains on 2 GPUs with micro-batch B; the 1-GPU baseline of the
same method trains with micro-batch B and 2 accumulation steps, so both see the same rows in every optimizer
step. Reported per run: per-step losses, steady trained tokens/s, peak GPU memory (rank 0); per engine and
method: the 2-vs-1 loss comparison and the speed ratio (2-GPU tokens/s over the baseline's; DDP's target is
at least 1.8). Every run goes through the real CLI in a child process, so the 2-GPU runs exercise the
launcher's own relaunch under torchrun. Results are written after every run, so a cut-off run keeps what it
measured: bench/results/multi_gpu-<UTC time>.json (or --out).

    python bench/multi_gpu.py --tokenizer .device/qwen-tok --data .device/alpaca_en_demo.json
    python bench/multi_gpu.py --cpu-smoke     # tiny model, gloo, 2 processes, 3 steps, DDP only (no GPU)

--engines-on-one-gpu also runs every engine on 1 GPU (under torchrun), doubling the run count.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from train_gpu_smoke import build_model, device, versions  # bench/ is on sys.path when run as a script

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ENGINES = {
    "ddp": {},
    "zero2": {"deepspeed": "zero2"},
    "zero3": {"deepspeed": "zero3"},
    "fsdp2": {"fsdp": "full_shard auto_wrap"},
}
METHODS = {
    "lora": {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "learning_rate": 1e-4},
    "full": {"finetuning_type": "full", "learning_rate": 1e-5},
}
DDP_SPEEDUP_TARGET = 1.8
# bf16 runs of different engines differ in reduction order and optimizer precision (ZeRO/FSDP keep fp32
# master weights, plain bf16 DDP does not), so 2-vs-1 losses agree only to bf16 noise; fp32 CPU runs exactly.
LOSS_TOLERANCE = {"gpu": {"mean_rel": 0.01, "max_rel": 0.03}, "cpu": {"mean_rel": 1e-5, "max_rel": 1e-5}}
RUN_TIMEOUT_S = 300
STOP_GRACE_S = 30


def smoke_data(path: Path, rows: int = 32) -> Path:
    """A small alpaca file for --cpu-smoke when no --data is given."""
    cities = ("Paris", "Rome", "Oslo", "Lima")
    data = [
        {"instruction": f"Name capital number {i % 4}.", "input": "Briefly." * (i % 3),
         "output": f"The capital is {cities[i % 4]}." + " Thanks." * (i % 2)}
        for i in range(rows)
    ]  # fmt: skip
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def cli_value(raw: str) -> object:
    """A --set value: JSON when it parses (true, 8, 0.1, "x"), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _key_value(item: str, parser: argparse.ArgumentParser) -> tuple[str, object]:
    key, eq, raw = item.partition("=")
    if not eq or not key:
        parser.error(f"--set {item!r}: expected KEY=VALUE")
    return key, cli_value(raw)


def run_config(
    a: argparse.Namespace, model: Path, data: Path, out: Path, method: str, engine: str, accumulation: int
) -> dict:
    cfg = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "dataset": str(data),
        "template": "qwen", "cutoff_len": a.cutoff_len, "output_dir": str(out), "overwrite_output_dir": True,
        "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": accumulation,
        "max_steps": a.steps, "logging_steps": 1, "save_strategy": "no", "plot_loss": False,
        "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "seed": 0, "report_to": "none",
        "data_cache_dir": str(a.work / "cache"), "preprocessing_num_workers": 1,
        **METHODS[method], **ENGINES[engine], **a.sets,
    }  # fmt: skip
    if not a.cpu_smoke:
        cfg["bf16"] = True
    return cfg


def child_env(a: argparse.Namespace, gpus: int, engine: str) -> dict[str, str]:
    """2 GPUs: both visible, the launcher relaunches by itself; 1 GPU with an engine: torchrun forced."""
    launch_vars = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "FORCE_TORCHRUN", "NPROC_PER_NODE")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # this checkout's tunesmith, installed or not (torchrun's workers inherit it)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    if a.cpu_smoke:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        if gpus > 1:
            env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(gpus))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
        if gpus == 1 and engine != "ddp":
            env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="1")
    return env


def run_cli(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """Run the CLI; on timeout send SIGINT (the launcher ends every rank), then SIGKILL after a grace."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        output += f"\n[bench] timed out after {timeout:.0f} s"
        return 124, output, time.perf_counter() - t0
    return proc.returncode, output, time.perf_counter() - t0


def steady_rate(records: list[dict], warm: int) -> float | None:
    """Trained tokens/s between the first logged step >= warm and the last (startup and warm-up excluded)."""
    later = [r for r in records if r["step"] >= warm] or records
    if len(later) < 2 or later[-1]["elapsed_s"] <= later[0]["elapsed_s"]:
        return None
    return (later[-1]["tokens_seen"] - later[0]["tokens_seen"]) / (
        later[-1]["elapsed_s"] - later[0]["elapsed_s"]
    )


def run_one(a: argparse.Namespace, model: Path, data: Path, method: str, engine: str, gpus: int) -> dict:
    name = f"{engine}-{method}-{gpus}{'proc' if a.cpu_smoke else 'gpu'}"
    out = a.work / f"out-{name}"
    accumulation = 2 if gpus == 1 else 1  # same global batch as 2 GPUs x 1
    cfg = run_config(a, model, data, out, method, engine, accumulation)
    cfg_path = a.work / f"{name}.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")  # JSON is valid YAML
    cmd = [sys.executable, "-m", "tunesmith.cli", "train", str(cfg_path)]
    rc, output, wall = run_cli(cmd, child_env(a, gpus, engine), a.run_timeout)
    result: dict = {"name": name, "engine": engine, "method": method, "gpus": gpus,
                    "gradient_accumulation_steps": accumulation, "config": cfg, "exit_code": rc,
                    "wall_s": round(wall, 1),
                    "launch_lines": [ln for ln in output.splitlines()
                                     if "launching torchrun" in ln or "distributed run" in ln][:2]}  # fmt: skip
    if rc != 0:
        result["output_head"] = "\n".join(ln for ln in output.splitlines() if "[tunesmith" in ln)[:4000]
        result["output_tail"] = output[-6000:]
        return result
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line]
    steps = [r for r in logs if r.get("loss") is not None]
    rate = steady_rate(steps, warm=1 if a.cpu_smoke else 10)
    result.update(
        steps=len(steps),
        losses=[r["loss"] for r in steps],
        tokens_trained=steps[-1]["tokens_seen"] if steps else 0,
        tokens_per_s_steady=None if rate is None else round(rate, 1),
        peak_mem_gib=max((r.get("peak_mem_gib") or 0) for r in logs),
    )
    return result


def compare(run: dict, base: dict, kind: str) -> dict:
    """2-GPU run against its 1-GPU baseline: per-step loss differences and the speed ratio."""
    out: dict = {
        "engine": run["engine"],
        "method": run["method"],
        "run": run["name"],
        "baseline": base["name"],
    }
    if run["exit_code"] != 0 or base["exit_code"] != 0:
        return out | {"ok": False, "reason": "a run failed"}
    pairs = list(zip(run["losses"], base["losses"]))
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in pairs]
    tol = LOSS_TOLERANCE[kind]
    out.update(
        steps_compared=len(pairs),
        loss_max_rel_diff=max(rel),
        loss_mean_rel_diff=sum(rel) / len(rel),
        final_loss=(pairs[-1][0], pairs[-1][1]),
        loss_tolerance=tol,
        losses_match=max(rel) <= tol["max_rel"] and sum(rel) / len(rel) <= tol["mean_rel"],
    )
    if run["tokens_per_s_steady"] and base["tokens_per_s_steady"]:
        out["speed_ratio"] = round(run["tokens_per_s_steady"] / base["tokens_per_s_steady"], 3)
        if run["engine"] == "ddp":
            out["speed_target"] = DDP_SPEEDUP_TARGET
            out["meets_speed_target"] = out["speed_ratio"] >= DDP_SPEEDUP_TARGET
    out["ok"] = out["losses_match"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, help="Qwen2.5 tokenizer folder (GPU mode)")
    p.add_argument("--data", type=Path, help="alpaca_en_demo.json (GPU mode; optional with --cpu-smoke)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--engines-on-one-gpu", action="store_true", help="also run each engine on 1 GPU")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="tiny model, gloo, 2 processes, 3 steps, DDP only"
    )
    p.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S, help="seconds per run")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="a tunesmith key for every run (value read as JSON when it parses), e.g. packing=true",
    )  # fmt: skip
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-multi-gpu"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    a.sets = dict(_key_value(item, p) for item in a.sets)
    if a.cpu_smoke:
        a.steps, a.engines, a.batch, a.cutoff_len = 3, ["ddp"], 2, 128
    elif not (a.tokenizer and a.data):
        p.error("--tokenizer and --data are required (or use --cpu-smoke)")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.cpu_smoke:
        from tunesmith.tiny_model import build_tiny_model

        model = build_tiny_model(a.work / "tiny-model")
        data = a.data or smoke_data(a.work / "smoke.json")
    else:
        model, data = build_model(a.work / "qwen2.5-0.5b-random", a.tokenizer), a.data
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = a.out or BENCH / "results" / f"multi_gpu-{date.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "bench": "multi_gpu", "date": date, "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
        "device": device(), "versions": versions() | {"deepspeed": _version("deepspeed")},
        "model": "tiny Qwen2 (tunesmith.tiny_model)" if a.cpu_smoke
        else "Qwen2.5-0.5B architecture, random init, bf16",
        "data": data.name, "steps": a.steps, "micro_batch": a.batch, "cutoff_len": a.cutoff_len, "sets": a.sets,
        "note": "1-GPU baselines use micro-batch B x 2 accumulation steps, 2-GPU runs B x 1 per GPU: the same "
                "rows per optimizer step. tokens/s counts trained (supervised) tokens of all ranks, between "
                "the first logged step >= 10 (>= 1 in cpu-smoke) and the last. peak_mem_gib is rank 0's.",
        "runs": [], "comparisons": [],
    }  # fmt: skip
    plan = [(m, "ddp", 1) for m in a.methods]
    plan += [(m, e, 2) for e in a.engines for m in a.methods]
    if a.engines_on_one_gpu:
        plan += [(m, e, 1) for e in a.engines if e != "ddp" for m in a.methods]
    t0 = time.perf_counter()
    for method, engine, gpus in plan:
        run = run_one(a, model, data, method, engine, gpus)
        results["runs"].append(run)
        shown = {
            k: run.get(k) for k in ("name", "exit_code", "wall_s", "tokens_per_s_steady", "peak_mem_gib")
        }
        print(json.dumps(shown), flush=True)
        if run["exit_code"] != 0:
            print(run["output_tail"][-3000:], file=sys.stderr)
        baselines = {r["method"]: r for r in results["runs"] if r["gpus"] == 1 and r["engine"] == "ddp"}
        results["comparisons"] = [
            compare(r, baselines[r["method"]], "cpu" if a.cpu_smoke else "gpu")
            for r in results["runs"] if r["gpus"] == 2 and r["method"] in baselines
        ]  # fmt: skip
        results["total_wall_s"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(results, indent=1))
    for c in results["comparisons"]:
        print(json.dumps(c))
    print(f"wrote {out} ({results['total_wall_s']} s)")
    return (
        0
        if all(r["exit_code"] == 0 for r in results["runs"]) and all(c["ok"] for c in results["comparisons"])
        else 1
    )


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
