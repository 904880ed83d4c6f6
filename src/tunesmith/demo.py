"""`make demo`: fine-tune the bundled tiny model into a support-ticket triage "expert" on CPU and show
that it learned — held-out exact match before and after, through the real `tunesmith train`.

    python -m tunesmith.demo [--out outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tunesmith.demo_data import demo_data_dir

# The recipe (found and checked over seeds in the demo task's design; see assets/demo/README.md).
RECIPE = {
    "stage": "sft", "do_train": True, "finetuning_type": "full", "template": "chatml",
    "dataset": "demo_triage_train", "cutoff_len": 256, "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "num_train_epochs": 3, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "logging_steps": 20,
    "save_strategy": "no", "plot_loss": True, "overwrite_output_dir": True, "report_to": "none",
    "seed": 0, "dataloader_num_workers": 0,
}  # fmt: skip
MAX_NEW_TOKENS = 24


def load_test_rows() -> list[dict[str, str]]:
    path = demo_data_dir() / "test.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def exact_match(
    model_dir: Path, rows: list[dict[str, str]], batch_size: int = 64
) -> tuple[float, list[dict]]:
    """Greedy answers for the test prompts; a hit needs the exact label AND the end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stops = GenerationConfig.from_pretrained(model_dir).eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    # Greedy means greedy: no sampling settings, whatever the model's generation_config says.
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stops, pad_token_id=tok.pad_token_id
    )
    results = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for r in chunk
        ]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=gen)
        for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist()):
            stopped = any(t in stops for t in ids)
            ids = ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]
            answer = tok.decode(ids, skip_special_tokens=True).strip()
            results.append(
                {
                    "ticket": r["input"],
                    "label": r["output"],
                    "answer": answer,
                    "stopped": stopped,
                    "hit": stopped and answer == r["output"],
                }
            )
    return sum(r["hit"] for r in results) / len(results), results


def _show(title: str, acc: float, results: list[dict[str, Any]], n: int = 3) -> None:
    print(f"\n{title}: held-out exact match {acc:.1%} ({sum(r['hit'] for r in results)}/{len(results)})")
    for r in results[:n]:
        mark = "ok " if r["hit"] else "bad"
        print(
            f"  [{mark}] {r['ticket'][:70]!r}\n        label {r['label']!r} -> answer {r['answer'][:60]!r}"
            f"{'' if r['stopped'] else ' (never stopped)'}"
        )


def main(argv: list[str] | None = None) -> int:
    import torch

    from tunesmith import load_config, run
    from tunesmith.tiny_model import build_tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    a = p.parse_args(argv)
    # One thread: on a busy 2-core machine two threads fight and can be 5x slower; one is always steady.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = build_tiny_model(a.out / "base", seed=0)
    rows = load_test_rows()
    print(
        f"tunesmith demo: a {sum(1 for _ in base.glob('*.safetensors'))}-file tiny chat model "
        f"({base}) learns to route support tickets (team, priority) from "
        f"{sum(1 for _ in (demo_data_dir() / 'train.jsonl').open())} examples; {len(rows)} held-out tickets."
    )
    before, before_rows = exact_match(base, rows)
    _show("before training", before, before_rows)

    out = a.out / "triage-full"
    cfg = load_config(
        None,
        {
            **RECIPE,
            "model_name_or_path": str(base),
            "dataset_dir": str(demo_data_dir()),
            "output_dir": str(out),
            "data_cache_dir": str(a.out / "cache"),
        },
    )
    print("\ntraining: tunesmith train (full fine-tuning, chatml template, 3 epochs on CPU) ...", flush=True)
    run(cfg)
    after, after_rows = exact_match(out, rows)
    _show("after training", after, after_rows)
    elapsed = time.perf_counter() - t0
    print(
        f"\nheld-out exact match: {before:.1%} -> {after:.1%} in {elapsed:.0f} s. The trained model is in {out}"
        f" (weights, tokenizer with its chat template, generation_config with stop tokens, trainer_log.jsonl,"
        f" training_loss.png, run.json)."
    )
    print(
        "\nnext:\n"
        f"  .venv/bin/tunesmith check {out / 'tunesmith_config.yaml'}   # see exactly what the model was trained on\n"
        f"  .venv/bin/tunesmith chat model_name_or_path={out} template=chatml do_sample=false   # talk to it\n"
        f"  .venv/bin/tunesmith export model_name_or_path={out} template=chatml export_dir=outputs/demo/export"
        "   # a checked, servable copy (+ Ollama Modelfile)\n"
        "  .venv/bin/tunesmith webui --root outputs   # the browser UI: train, chat, export, compare runs\n"
        "  .venv/bin/tunesmith train examples/qwen2.5_lora_sft.yaml      # your model and data (see examples/)\n"
        "  .venv/bin/tunesmith templates                                  # the built-in chat templates"
    )
    return 0 if after >= 0.8 else 1


if __name__ == "__main__":
    raise SystemExit(main())
