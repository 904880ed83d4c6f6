"""GPU smoke benchmark of `tunesmith train`: LoRA and QLoRA SFT of the Qwen2.5-0.5B architecture.

The model is built from Qwen2.5-0.5B's published config with random weights (no download), with the real
Qwen2.5 tokenizer; data is LLaMA-Factory's alpaca_en_demo. Each method runs through the real CLI in a
child process; tokens/s (trained, non-padding tokens) and peak GPU memory come from trainer_log.jsonl.
Raw results: bench/results/train_gpu_smoke-<UTC time>.json (or --out).

    python bench/train_gpu_smoke.py --tokenizer DIR --data FILE [--steps 60] [--methods lora qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# Qwen2.5-0.5B(-Instruct) config.json as published (architecture only; weights are random here).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "vocab_size": 151936,
    "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
    "sliding_window": 32768, "max_window_layers": 21, "use_sliding_window": False, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_cache": True,
}  # fmt: skip

METHODS = {
    "lora": {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 8},
    "qlora": {"finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "quantization_bit": 4},
}


def build_model(out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in QWEN25_05B.items() if k != "architectures"}))
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tunesmith", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def device() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "platform": platform.platform(), "cpus": os.cpu_count()}
    p = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "name": p.name,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "cuda_version": torch.version.cuda,
    }


def run_method(name: str, model: Path, data: Path, work: Path, steps: int, cutoff: int, batch: int) -> dict:
    out = work / f"out-{name}"
    (work / "data").mkdir(exist_ok=True)
    overrides = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "dataset": str(data),
        "template": "qwen", "cutoff_len": cutoff, "output_dir": str(out), "overwrite_output_dir": True,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
        "max_steps": steps, "logging_steps": 5, "save_strategy": "no", "plot_loss": False,
        "data_cache_dir": str(work / "cache"), "bf16": True, **METHODS[name],
    }  # fmt: skip
    cmd = [sys.executable, "-m", "tunesmith.cli", "train", *[f"{k}={v}" for k, v in overrides.items()]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result: dict = {
        "method": name,
        "overrides": overrides,
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
    }
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-4000:]
        return result
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train = [r for r in logs if r.get("loss") is not None and r.get("tokens_per_s")]
    steady = [r for r in train if r["step"] >= 10] or train
    result.update(
        tokens_per_s_steady=round(sum(r["tokens_per_s"] for r in steady) / len(steady), 1),
        tokens_per_s_last=train[-1]["tokens_per_s"],
        tokens_trained=train[-1]["tokens_seen"],
        peak_mem_gib=max(r.get("peak_mem_gib") or 0 for r in logs),
        first_loss=train[0]["loss"],
        last_loss=train[-1]["loss"],
        steps=train[-1]["step"],
        note="tokens/s counts supervised (non-padding, non-prompt) tokens; averaged over logged steps >= 10",
    )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="Qwen2.5 tokenizer folder")
    p.add_argument("--data", type=Path, required=True, help="alpaca_en_demo.json")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-gpu-smoke"))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = build_model(a.work / "qwen2.5-0.5b-random", a.tokenizer)
    results = {
        "bench": "train_gpu_smoke", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device(), "versions": versions(), "model": "Qwen2.5-0.5B architecture, random init, bf16",
        "data": str(a.data.name), "runs": [run_method(m, model, a.data, a.work, a.steps, a.cutoff_len, a.batch)
                                           for m in a.methods],
    }  # fmt: skip
    out = (
        a.out
        or Path(__file__).parent / "results" / f"train_gpu_smoke-{results['date'].replace(':', '')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for r in results["runs"]:
        print(json.dumps({k: v for k, v in r.items() if k not in ("overrides", "stderr_tail")}))
        if r.get("stderr_tail"):
            print(r["stderr_tail"], file=sys.stderr)
    print(f"wrote {out}")
    return 0 if all(r["exit_code"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
