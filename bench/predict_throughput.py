"""Batch prediction throughput: `tunesmith predict` against LLaMA-Factory's `do_predict`, same GPU, same run.

Model: the Qwen2.5-0.5B architecture from its published config, random init, bf16, with the real Qwen2.5
tokenizer (as bench/train_gpu_smoke.py builds it). Prompts: the first --prompts rows of alpaca_en_demo
(template qwen, so both sides render the same prompt with Qwen's default system prompt), greedy, up to
--max-new-tokens new tokens. Phases (each result is written to the JSON as soon as it is known):

1. tunesmith: `tunesmith predict` in a child process with its defaults (length-sorted batches of 128 on
   GPU). samples/s = samples / the generation loop's seconds (predictions.meta.json; model load and data
   preparation excluded, like LLaMA-Factory's predict_runtime); the child's wall time is recorded too.
2. check: the first --check prompts (data order) one at a time through plain `model.generate` (same
   dtype, greedy, the same stop ids, no tunesmith code) compared with tunesmith's predictions: the count
   of identical texts. When bf16 batching changes some of them (near-ties of a random-init model), the
   check runs again in fp32 (tunesmith predict with infer_dtype float32 on those prompts) and both counts
   are reported.
3. llamafactory: `run_exp` with stage sft, do_predict, predict_with_generate, its default batch size
   (per_device_eval_batch_size 8) and the same generation settings, on the first --lf-prompts prompts (it
   is slow); samples/s from its own predict_results.json (predict_samples_per_second; its compute_metrics
   runs inside that window). Needs --lf-pythonpath (the device: bench/lf_device_env.py install) or
   --lf-python (a local LLaMA-Factory venv).

The ratio is tunesmith samples/s over LLaMA-Factory's (goal >= 10, must be >= 5).

    python bench/predict_throughput.py --tokenizer .device/qwen-tok --data .device/alpaca_en_demo.json \\
        --lf-pythonpath /tmp/lf --out $OUT/predict_throughput.json
    python bench/predict_throughput.py --cpu-smoke   # tiny model, 16 prompts, 16 tokens, tunesmith + check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu_smoke import build_model as build_qwen  # noqa: E402
from train_gpu_smoke import device, versions  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LF_DATASET = "alpaca_bench"


def write_prompts(src: Path | None, n: int, folder: Path) -> Path:
    """The first n alpaca rows as prompts.json, registered as alpaca_bench in folder/dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if src is not None:
        rows = json.loads(src.read_text(encoding="utf-8"))[:n]
    else:  # --cpu-smoke without --data
        rows = [
            {"instruction": f"Name the capital city number {i}.", "input": "", "output": "Paris."}
            for i in range(n)
        ]
    (folder / "prompts.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({LF_DATASET: {"file_name": "prompts.json"}}))
    return folder / "prompts.json"


def build_model(work: Path, tokenizer: Path | None, cpu_smoke: bool) -> Path:
    if cpu_smoke:
        from tunesmith.tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny-model")
    return build_qwen(work / "qwen2.5-0.5b-random", tokenizer)


def run_tunesmith(model: Path, data: Path, out: Path, a: argparse.Namespace, **extra: object) -> dict:
    """`tunesmith predict` in a child process; returns its summary (predictions.meta.json) and wall time."""
    keys = {
        "model_name_or_path": model, "template": "qwen", "eval_dataset": data, "output_dir": out,
        "overwrite_output_dir": True, "do_sample": False, "max_new_tokens": a.max_new_tokens,
        "data_cache_dir": a.work / "cache", "infer_dtype": "float32" if a.cpu_smoke else "bfloat16", **extra,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "tunesmith.cli", "predict", *[f"{k}={v}" for k, v in keys.items()]]
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: predict would resume an earlier one
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(REPO / "src"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"exit_code": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
    meta = json.loads((out / "predictions.meta.json").read_text())
    s = meta["summary"]
    return {
        "exit_code": 0, "samples": s["samples"], "seconds": s["seconds"], "samples_per_s": s["samples_per_s"],
        "completion_tokens": s["completion_tokens"], "finish_reasons": s["finish_reasons"],
        "batch_size": meta["batch_size"], "dtype": meta["engine"]["dtype"], "process_wall_s": round(wall, 1),
        "scores": s.get("scores"), "overrides": {k: str(v) for k, v in keys.items()},
    }  # fmt: skip


def _env(pythonpath: Path | str, **more: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **more)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH", "")) if p)
    return env


def plain_check(model_dir: Path, predictions: Path, n: int, dtype: str, max_new_tokens: int) -> dict:
    """Greedy plain model.generate, one prompt at a time, against the first n predictions (data order)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    recs = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()][:n]
    meta = json.loads((predictions.parent / "predictions.meta.json").read_text())
    stop_ids = meta["engine"]["stop_ids"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0],
    )  # fmt: skip
    same, differ, agree = 0, [], []
    t0 = time.perf_counter()
    for r in recs:
        ids = tok.backend_tokenizer.encode(r["prompt"], add_special_tokens=False).ids
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
        new = out[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
        text = tok.decode(new[:cut], skip_special_tokens=True)
        if text == r["predict"]:
            same += 1
        else:
            differ.append(r["id"])
        # how far the two answers agree before they part (1.0 = identical)
        prefix = next(
            (i for i, (x, y) in enumerate(zip(text, r["predict"])) if x != y),
            min(len(text), len(r["predict"])),
        )
        agree.append(prefix / max(len(text), len(r["predict"]), 1))
    return {"dtype": dtype, "prompts": len(recs), "identical": same, "differ_ids": differ[:10],
            "agreeing_prefix_share_mean": round(sum(agree) / max(len(agree), 1), 4),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def run_llamafactory(model: Path, data_dir: Path, out: Path, a: argparse.Namespace) -> dict:
    """LLaMA-Factory do_predict in a child process (its own python or PYTHONPATH); its predict_results.json."""
    args = {
        "model_name_or_path": str(model), "stage": "sft", "do_predict": True, "predict_with_generate": True,
        "eval_dataset": LF_DATASET, "dataset_dir": str(data_dir), "template": "qwen", "output_dir": str(out),
        "overwrite_output_dir": True, "overwrite_cache": True, "do_sample": False,
        "max_new_tokens": a.max_new_tokens, "report_to": "none", "max_samples": a.lf_prompts,
    }  # fmt: skip
    if not a.cpu_smoke:
        args["bf16"] = True
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "lf_args.json").write_text(json.dumps(args))
    code = (
        "import json, sys, time; t0 = time.perf_counter()\n"
        "from llamafactory.train.tuner import run_exp\n"
        f"run_exp(json.load(open({str(out.parent / 'lf_args.json')!r})))\n"
        "mods = sorted({m.split('.')[0] for m in sys.modules if not m.startswith('_')})\n"
        f"json.dump({{'wall_s': time.perf_counter() - t0, 'modules': mods}}, open({str(out / 'bench_wall.json')!r}, 'w'))\n"
    )
    python = a.lf_python or sys.executable
    env = _env(a.lf_pythonpath or "", DISABLE_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"exit_code": proc.returncode, "stderr_tail": proc.stderr[-4000:], "args": args}
    res = json.loads((out / "predict_results.json").read_text())
    return {
        "exit_code": 0, "samples": a.lf_prompts, "seconds": res.get("predict_runtime"),
        "samples_per_s": res.get("predict_samples_per_second"), "process_wall_s": round(wall, 1),
        "metrics": {k: v for k, v in res.items() if k.startswith("predict_") and "runtime" not in k},
        "batch_size": 8, "args": args,
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, help="Qwen2.5 tokenizer folder (.device/qwen-tok)")
    p.add_argument("--data", type=Path, help="alpaca_en_demo.json (.device/alpaca_en_demo.json)")
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--check", type=int, default=50, help="prompts checked against plain model.generate")
    p.add_argument("--lf-prompts", type=int, default=200, help="prompts LLaMA-Factory predicts (a subset)")
    p.add_argument(
        "--lf-pythonpath", default=None, help="folder of LLaMA-Factory and its pins (lf_device_env)"
    )
    p.add_argument("--lf-python", default=None, help="python of a LLaMA-Factory venv (instead)")
    p.add_argument("--phases", nargs="+", default=["tunesmith", "check", "llamafactory"])
    p.add_argument("--check-dtype", choices=["auto", "float32"], default="auto",
                   help="auto: check the bf16 run, then fp32 if some differ; float32: only the fp32 check")  # fmt: skip
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model, 16 prompts, 16 tokens; LLaMA-Factory only when --lf-python/--lf-pythonpath")  # fmt: skip
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-predict-bench"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.cpu_smoke:
        a.prompts, a.max_new_tokens, a.check = 16, 16, 16
        if not (a.lf_pythonpath or a.lf_python):
            a.phases = [ph for ph in a.phases if ph != "llamafactory"]
        a.lf_prompts = min(a.lf_prompts, a.prompts)
    elif a.tokenizer is None or a.data is None:
        p.error("--tokenizer and --data are needed (or --cpu-smoke)")
    if "llamafactory" in a.phases and not (a.lf_pythonpath or a.lf_python):
        p.error("the llamafactory phase needs --lf-pythonpath or --lf-python (or leave it out of --phases)")
    a.work.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = a.out or BENCH / "results" / f"predict_throughput-{date.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # an existing --out keeps the phases it holds (run the phases in separate commands with the same --out)
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    results |= {
        "bench": "predict_throughput", "date": date, "device": device(), "versions": versions(),
        "model": "tiny (cpu smoke)" if a.cpu_smoke else "Qwen2.5-0.5B architecture, random init, bf16",
        "prompts": a.prompts, "max_new_tokens": a.max_new_tokens, "decoding": "greedy",
    }  # fmt: skip

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    model = build_model(a.work, a.tokenizer, a.cpu_smoke)
    prompts = write_prompts(a.data, a.prompts, a.work / "data")
    ts_out = a.work / "tunesmith-out"
    if "tunesmith" in a.phases:
        results["tunesmith"] = run_tunesmith(model, prompts, ts_out, a)
        save()
    if "check" in a.phases and a.check_dtype == "float32":
        # straight to fp32: on a random-init model bf16 rounding flips near-tied argmaxes (see bench/README)
        fp32_out = a.work / "tunesmith-fp32"
        run = run_tunesmith(model, prompts, fp32_out, a, infer_dtype="float32", max_samples=a.check)
        checks = [run if run["exit_code"] else
                  plain_check(model, fp32_out / "predictions.jsonl", a.check, "float32", a.max_new_tokens)]  # fmt: skip
        results["check"] = checks
        save()
    elif "check" in a.phases and results.get("tunesmith", {}).get("exit_code") == 0:
        dtype = "float32" if a.cpu_smoke else "bfloat16"
        checks = [plain_check(model, ts_out / "predictions.jsonl", a.check, dtype, a.max_new_tokens)]
        results["check"] = checks
        save()
        if checks[0]["identical"] < checks[0]["prompts"] and dtype != "float32":
            fp32_out = a.work / "tunesmith-fp32"
            run = run_tunesmith(model, prompts, fp32_out, a, infer_dtype="float32", max_samples=a.check)
            if run["exit_code"] == 0:
                checks.append(
                    plain_check(model, fp32_out / "predictions.jsonl", a.check, "float32", a.max_new_tokens)
                )
            else:
                checks.append({"dtype": "float32", "error": run})
            save()
    if "llamafactory" in a.phases:
        results["llamafactory"] = run_llamafactory(model, a.work / "data", a.work / "lf-out", a)
        save()
    ts, lf = results.get("tunesmith", {}), results.get("llamafactory", {})
    if ts.get("samples_per_s") and lf.get("samples_per_s"):
        ratio = ts["samples_per_s"] / lf["samples_per_s"]
        results["ratio"] = {"samples_per_s": round(ratio, 2), "goal": 10, "must": 5, "meets_must": ratio >= 5}
        save()
    for key in ("tunesmith", "check", "llamafactory", "ratio"):
        if key in results:
            print(key, json.dumps(results[key])[:1500])
    print(f"wrote {out}")
    ok = results.get("tunesmith", {}).get("exit_code") == 0
    return 0 if ok and results.get("llamafactory", {}).get("exit_code", 0) == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
