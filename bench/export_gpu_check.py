"""GPU check of `tunesmith export` with quantization: LoRA-train, export 16-bit, 4-bit and 8-bit, load, generate.

Qwen2.5-0.5B architecture (random init, bf16, the real Qwen2.5 tokenizer), a LoRA adapter trained for
--steps steps on LLaMA-Factory's alpaca_en_demo through the real CLI, then `tunesmith export` three times
(no quantization, export_quantization_bit 4 and 8; bitsandbytes must be installed). Each exported folder is
then loaded with plain transformers on the GPU and generates greedily; its footprint and the export's own
check report are recorded. Raw results: --out (JSON).

    python bench/export_gpu_check.py --tokenizer .device/qwen-tok --data .device/alpaca_en_demo.json --out R.json
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
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args], env=ENV, capture_output=True, text=True
    )


def load_and_generate(folder: Path, tokenizer_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda")
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Give three tips for staying healthy."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to("cuda")
    with torch.inference_mode():
        out = model.generate(**prompt, do_sample=False, max_new_tokens=32)
    new = out[0, prompt["input_ids"].shape[1] :]
    quant = getattr(model.config, "quantization_config", None)
    return {
        "loaded_s": round(time.time() - t0, 2),
        "footprint_gib": round(model.get_memory_footprint() / 2**30, 3),
        "quantization_config": None
        if quant is None
        else (quant if isinstance(quant, dict) else quant.to_dict()),
        "new_tokens": int(new.numel()),
        "text": tok.decode(new, skip_special_tokens=False)[:200],
        "folder_mib": round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-export-check"))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = build_model(a.work / "model", a.tokenizer)
    results: dict = {"bench": "export_gpu_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "device": device(), "versions": versions(), "exports": []}  # fmt: skip
    adapter = a.work / "adapter"
    train = cli("train", f"model_name_or_path={model}", "stage=sft", "do_train=true", f"dataset={a.data}",
                "template=qwen", "finetuning_type=lora", "lora_target=all", "cutoff_len=512",
                f"output_dir={adapter}", "overwrite_output_dir=true", "per_device_train_batch_size=8",
                "learning_rate=1e-3", f"max_steps={a.steps}", "save_strategy=no", "plot_loss=false",
                "bf16=true", "report_to=none", f"data_cache_dir={a.work / 'cache'}")  # fmt: skip
    results["train_exit_code"] = train.returncode
    if train.returncode:
        results["train_tail"] = (train.stdout + train.stderr)[-3000:]
        a.out.write_text(json.dumps(results, indent=1))
        return 1
    for bits in (None, 4, 8):
        out = a.work / f"export-{bits or 16}"
        keys = [f"model_name_or_path={model}", f"adapter_name_or_path={adapter}", "template=qwen",
                f"export_dir={out}", "export_device=auto"]  # fmt: skip
        if bits:
            keys.append(f"export_quantization_bit={bits}")
        t0 = time.time()
        proc = cli("export", *keys)
        entry: dict = {"bits": bits or 16, "exit_code": proc.returncode, "export_s": round(time.time() - t0, 1),
                       "summary": proc.stdout.strip().splitlines()}  # fmt: skip
        if proc.returncode:
            entry["tail"] = (proc.stdout + proc.stderr)[-3000:]
        else:
            entry["report"] = json.loads((out / "export_report.json").read_text())
            entry["reload"] = load_and_generate(out, a.tokenizer)
        results["exports"].append(entry)
        a.out.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in entry.items() if k != "report"}, indent=1), flush=True)
    return 0 if all(e["exit_code"] == 0 for e in results["exports"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
