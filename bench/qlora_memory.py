"""QLoRA memory on the Llama-3.1-8B architecture (issue #8): peak at sequence 2048, longest trainable context.

Goals: QLoRA SFT at cutoff 2048 fits in <= 7 GiB peak (torch.cuda.max_memory_allocated); the longest
trainable context on one GPU is measured. The results JSON is rewritten after every phase and context try.

1. build: Llama-3.1-8B-Instruct's published config (LLAMA31_8B), random init, bf16 (built on the GPU),
   saved with the given tokenizer into --work; an existing folder is reused.
2. train: `tunesmith train` through the CLI in a child process (TRAIN_KEYS: QLoRA r8 on all linears,
   template llama3, cutoff 2048, packing, batch 1, 10 steps, bf16). Peak = max of trainer_log.jsonl's
   peak_mem_gib; tokens/s counts trained tokens (label != -100) over steps >= 3.
3. context: in this process, the model loaded as training loads it (loader.load_model, 4-bit, gradient
   checkpointing; tuning.apply_tuning, LoRA r8 on all linears; fp32 adapters, bf16 autocast, tunesmith's
   SDPA kernels), then one forward + backward of [1, L] random tokens, every position labelled, through the
   trainer's fused LM head + CE (no [L x vocab] logits). L doubles from 2048 to the config's 131072, then
   bisects to 1024 tokens (`next_length`); no try starts that is predicted to end after --time-limit-s.

On the device, one call; bitsandbytes and orjson, missing from the image, come as wheels; $OUT comes back
even when the call's limit cuts the run. Carry (all of .whl is over the 64 MiB limit): [".device/llama-tok",
".device/alpaca_en_demo.json", ".whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
".whl/orjson-3.13.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"]

    python3 -m pip install -q --no-deps --target /tmp/site .whl/bitsandbytes-0.50.2-*.whl \
        .whl/orjson-3.13.0-*.whl && PYTHONPATH=/tmp/site:src python3 bench/qlora_memory.py \
        --tokenizer .device/llama-tok --data .device/alpaca_en_demo.json --out $OUT/qlora_memory-h100.json

`--cpu-smoke` proves the code paths on CPU with a 2-layer model of the same family: tunesmith's loader
refuses 4-bit without CUDA, so it trains 16-bit LoRA; peak memory is null (no CUDA allocator statistics);
`--fake-oom-above N` counts every L > N as an OOM.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from train_gpu_smoke import device, versions  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
GOAL_PEAK_GIB = 7.0

# meta-llama/Llama-3.1-8B-Instruct config.json as published (architecture only; weights are random here).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "use_cache": True,
}  # fmt: skip
# --cpu-smoke: the same family at a size a CPU trains in seconds.
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2}  # fmt: skip
TRAIN_KEYS = {
    "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8,
    "quantization_bit": 4, "template": "llama3", "cutoff_len": 2048, "packing": True,
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
    "max_steps": 10, "bf16": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
    "plot_loss": False, "overwrite_output_dir": True, "seed": 0,
}  # fmt: skip
SMOKE_NOTE = (
    "CPU smoke: tunesmith's loader refuses 4-bit without CUDA (QLoRA needs a CUDA GPU), so this trains "
    "16-bit LoRA in fp32; peak memory is null: torch.cuda.max_memory_allocated does not exist on CPU"
)


def next_length(
    tries: Sequence[tuple[int, bool]], start: int, max_len: int, step: int, max_bisect: int
) -> int | None:
    """The next context length to try, given (length, fitted) so far; None when the search is over.

    Doubles from `start`, capped at `max_len`, until a length does not fit; then bisects between the
    longest fit and the shortest misfit, rounded down to a multiple of `step`, for at most `max_bisect` tries.
    Example: fits up to 8192, OOM at 16384 -> 12288, then 10240 or 14336, ...
    """
    if not tries:
        return start
    longest = max((n for n, ok in tries if ok), default=0)
    misfits = [i for i, (_, ok) in enumerate(tries) if not ok]
    if not misfits:
        return None if longest >= max_len else min(2 * longest, max_len)
    if len(tries) - misfits[0] - 1 >= max_bisect:
        return None
    shortest_misfit = min(tries[i][0] for i in misfits)
    mid = (longest + shortest_misfit) // 2 // step * step
    return mid if longest < mid < shortest_misfit else None


def predict_seconds(fits: Sequence[tuple[int, float]], length: int) -> float | None:
    """Seconds a try at `length` should take, from (length, seconds) of tries that fitted; None without any.

    Time grows like L**k, k between 1 (the linear layers) and 2 (attention), k fitted to the two longest
    fits; from one fit, k = 2 (the cautious guess).
    """
    if not fits:
        return None
    pts = sorted(fits)
    n1, t1 = pts[-1]
    k = 2.0
    if len(pts) > 1 and pts[-2][0] < n1 and pts[-2][1] > 0 and t1 > 0:
        k = min(2.0, max(1.0, math.log(t1 / pts[-2][1]) / math.log(n1 / pts[-2][0])))
    return t1 * (length / n1) ** k


def model_config(smoke: bool, vocab_size: int, bos: int | None, eos: int | None) -> dict:
    """LLAMA31_8B, or for the smoke the same family in SMOKE_SHAPE with the given tokenizer's vocabulary."""
    cfg = json.loads(json.dumps(LLAMA31_8B))  # a deep copy: transformers rewrites rope_scaling in place
    if not smoke:
        return cfg
    return {**cfg, **SMOKE_SHAPE, "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos}


def build_model(out: Path, tokenizer_dir: Path, smoke: bool) -> dict:
    """Random-init bf16 (fp32 for the smoke) model + tokenizer saved in `out`, unless it is already there.

    Returns where, whether it was built now, the seconds that took, and the saved config.json (what runs).
    """
    t0 = time.perf_counter()
    built = not (out / "config.json").exists()
    if built:
        _build(out, tokenizer_dir, smoke)
    return {
        "path": str(out),
        "built": built,
        "seconds": round(time.perf_counter() - t0, 1),
        "config": json.loads((out / "config.json").read_text()),
    }


def _build(out: Path, tokenizer_dir: Path, smoke: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = model_config(smoke, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    cuda = torch.cuda.is_available()
    partial = out.with_name(out.name + ".partial")  # renamed when complete: a killed build is never reused
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # 8B on the GPU: init takes seconds, not minutes
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}),
            dtype=torch.float32 if smoke else torch.bfloat16,
        )
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    partial.rename(out)


def train_overrides(model: Path, data: Path, work: Path, a: argparse.Namespace) -> dict:
    """TRAIN_KEYS for this run; the smoke drops 4-bit and bf16 (see SMOKE_NOTE)."""
    keys = {**TRAIN_KEYS, "model_name_or_path": str(model), "dataset": str(data), "template": a.template,
            "output_dir": str(work / "out-train"), "data_cache_dir": str(work / "cache"),
            "cutoff_len": a.cutoff_len, "max_steps": a.steps}  # fmt: skip
    if a.tiled_mlp_tokens:
        keys["tiled_mlp_tokens"] = a.tiled_mlp_tokens
    if a.cpu_smoke:
        keys.pop("quantization_bit")
        keys["bf16"] = False
    return keys


def summarize_train_log(rows: list[dict], cuda: bool, warm: int = 3) -> dict:
    """Peak GiB, trained tokens/s and per step over steps >= warm, losses; from trainer_log.jsonl records."""
    train = [r for r in rows if r.get("loss") is not None]
    if not train:
        return {"error": "trainer_log.jsonl has no training records"}
    later = [r for r in train if r["step"] >= warm]
    later = later if len(later) > 1 else train
    steps, dt = later[-1]["step"] - later[0]["step"], later[-1]["elapsed_s"] - later[0]["elapsed_s"]
    dtok = later[-1]["tokens_seen"] - later[0]["tokens_seen"]
    peak = max(r.get("peak_mem_gib") or 0.0 for r in rows)
    return {
        "peak_mem_gib": peak if cuda else None,
        "peak_rss_gib": None if cuda else peak,  # on CPU trainer_log's peak_mem_gib is the process's RSS
        "tokens_per_s": round(dtok / dt, 1) if dt > 0 else None,
        "tokens_per_step": round(dtok / steps, 1) if steps else None,
        "s_per_step": round(dt / steps, 4) if steps else None,
        "window_steps": [later[0]["step"], later[-1]["step"]],
        "losses": [r["loss"] for r in train],
        "steps": train[-1]["step"],
    }


def run_train(keys: dict, timeout_s: float) -> dict:
    """`tunesmith train` with `keys` in a child process; its log summarized (see summarize_train_log)."""
    import torch

    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", *args], env=env,
                              capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:  # what the child printed so far comes as bytes
        parts = [
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
        ]
        code, output = None, f"killed after {timeout_s:.0f} s\n" + "".join(parts)
    res: dict[str, Any] = {"exit_code": code, "wall_s": round(time.perf_counter() - t0, 1)}
    log = Path(keys["output_dir"]) / "trainer_log.jsonl"
    if log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        res.update(summarize_train_log(rows, torch.cuda.is_available()))
    if code != 0 or "error" in res:
        res["output_tail"] = output[-4000:]
    return res


def load_for_context(
    model_dir: Path, quantize: bool, tiled_mlp_tokens: int | None = None
) -> tuple[Any, Any, dict]:
    """(PEFT model in train mode, its FusedHead, load facts), loaded and tuned as `tunesmith train` does."""
    import torch

    from tunesmith.model.loader import load_model, load_tokenizer
    from tunesmith.model.tuning import TuningOptions, apply_tuning
    from tunesmith.training.fused_head import probe_fused_head

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    loaded = load_model(model_dir, dtype="bfloat16" if quantize else "float32", gradient_checkpointing=True,
                        quantization_bit=4 if quantize else None, tokenizer=tokenizer)  # fmt: skip
    tuned = apply_tuning(loaded.model, TuningOptions(lora_rank=8, lora_target=("all",)), quantized=quantize)
    model = tuned.model
    if tiled_mlp_tokens:  # as training.causal_lm._load_model
        from tunesmith.model.compile import decoder_layers
        from tunesmith.model.tiled_mlp import tile_mlps

        tile_mlps(decoder_layers(model), tiled_mlp_tokens)
    for param in model.parameters():  # as training.causal_lm._set_trainable_dtype: trained weights in fp32
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    model.train()
    dev = next(p.device for p in model.parameters())
    probe = (torch.arange(16, device=dev)[None] + 1000) % model.config.vocab_size
    fused = probe_fused_head(model, {"input_ids": probe, "attention_mask": torch.ones_like(probe)})
    if isinstance(fused, str):
        raise RuntimeError(f"the fused loss cannot be used on this model: {fused}")
    by_dtype: dict[
        str, float
    ] = {}  # e.g. the 4-bit linears (uint8) vs what prepare_model_for_kbit_training upcast
    for param in model.parameters():
        key = str(param.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0.0) + param.numel() * param.element_size() / 2**30
    facts = {
        "param_gib_by_dtype": {k: round(v, 3) for k, v in by_dtype.items()},
        "load_s": round(time.perf_counter() - t0, 1), "quantization_bit": loaded.quantization_bit,
        "dtype": str(loaded.dtype), "attn_implementation": loaded.attn_implementation,
        "gradient_checkpointing": loaded.gradient_checkpointing, "trainable_params": tuned.trainable_params,
        "all_params": tuned.all_params, "lora_targets": list(tuned.lora_targets),
        "fused_chunk_rows": fused.chunk_rows,
        "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 3) if dev.type == "cuda" else None,
    }  # fmt: skip
    return model, fused, facts


def is_oom(error: BaseException) -> bool:
    """Out of GPU memory: torch's own error, or a CUDA library (cuBLAS, cuDNN) failing to allocate."""
    text = str(error)
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in text or "ALLOC_FAILED" in text


def _forward_backward(model: Any, fused: Any, ids: Any, autocast: Any) -> float:
    """A training micro-step's forward + backward, as TunesmithTrainer.compute_loss and HF's Trainer do."""
    import torch

    from tunesmith.model.attention import sdpa_kernels

    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with (
        sdpa_kernels(),
        torch.autocast(ids.device.type, dtype=autocast or torch.bfloat16, enabled=bool(autocast)),
    ):
        total, count, _ = fused.loss_sum(model, inputs, ids)
        loss = total / count
    # Backward inside the same SDPA choice, as the trainer does: checkpointing recomputes attention there,
    # and a different kernel would save differently shaped tensors (torch's CheckpointError).
    with sdpa_kernels():
        loss.backward()
    return float(loss.detach())  # a device sync: the step is complete when timed


def try_length(model: Any, fused: Any, length: int, fake_oom_above: int | None = None) -> dict:
    """One forward + backward at [1, length]: fitted or OOM, peak GiB (None on CPU), seconds, loss."""
    import torch

    if fake_oom_above is not None and length > fake_oom_above:
        fake = f"fake (--fake-oom-above {fake_oom_above})"
        return {"len": length, "fit": False, "oom": fake, "seconds": 0.0, "peak_gib": None,
                "peak_reserved_gib": None, "loss": None}  # fmt: skip
    dev = next(p.device for p in model.parameters())
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(
        0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)
    )
    autocast = torch.bfloat16 if cuda else None
    t0 = time.perf_counter()
    loss, oom = None, None
    try:
        loss = _forward_backward(model, fused, ids.to(dev), autocast)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        oom = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    seconds = time.perf_counter() - t0
    # Outside the except block: its traceback (holding the activations) is gone, so the memory can go back.
    model.zero_grad(set_to_none=True)
    gc.collect()
    record = {
        "len": length, "fit": oom is None, "oom": oom, "seconds": round(seconds, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "loss": loss,
    }  # fmt: skip
    if cuda:
        torch.cuda.empty_cache()
    return record


def search_context(
    measure: Callable[[int], dict],
    start: int,
    max_len: int,
    step: int,
    max_bisect: int,
    deadline: float,
    on_try: Callable[[list[dict]], None],
) -> dict:
    """Run `measure` over the lengths `next_length` picks; stop before a try predicted to pass `deadline`."""
    tries: list[dict] = []
    stopped = "search complete"
    while (
        length := next_length([(t["len"], t["fit"]) for t in tries], start, max_len, step, max_bisect)
    ) is not None:
        guess = predict_seconds([(t["len"], t["seconds"]) for t in tries if t["fit"]], length)
        if guess is not None and time.monotonic() + guess > deadline:
            stopped = (
                f"time limit: L={length} predicted {guess:.0f} s, {deadline - time.monotonic():.0f} s left"
            )
            break
        tries.append(measure(length))
        on_try(tries)
    fits = [t for t in tries if t["fit"]]
    best = max(fits, key=lambda t: t["len"]) if fits else None
    return {
        "tries": tries,
        "stopped": stopped,
        "longest_fit": best["len"] if best else None,
        "longest_fit_peak_gib": best["peak_gib"] if best else None,
        "shortest_oom": min((t["len"] for t in tries if not t["fit"]), default=None),
    }


def goals(results: dict) -> dict:
    """Issue #8's two memory goals, judged from what the run measured (None: not measured)."""
    peak = (results.get("train") or {}).get("peak_mem_gib")
    ctx = results.get("context") or {}
    verdict = None if peak is None else peak <= GOAL_PEAK_GIB
    longest = {"value": ctx.get("longest_fit"), "peak_gib": ctx.get("longest_fit_peak_gib"),
               "shortest_oom": ctx.get("shortest_oom"), "stopped": ctx.get("stopped")}  # fmt: skip
    return {
        "qlora_2048_peak_le_7gib": {"target_gib": GOAL_PEAK_GIB, "value_gib": peak, "pass": verdict},
        "longest_trainable_context": longest,
    }


def write(results: dict, out: Path) -> None:
    results["goals"] = goals(results)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)  # a run killed mid-write keeps the previous complete file


def summary(results: dict) -> str:
    """A few lines for the console: the train phase, every context try, the goal."""
    lines = []
    if t := results.get("train"):
        lines.append(
            f"train: exit {t['exit_code']}, peak {t.get('peak_mem_gib')} GiB, {t.get('tokens_per_s')} "
            f"trained tokens/s, {t.get('tokens_per_step')} tokens/step, losses {t.get('losses')}"
        )
    if c := results.get("context"):
        for r in c["tries"]:
            fit = "fit" if r["fit"] else "OOM"
            lines.append(f"context L={r['len']}: {fit}, peak {r['peak_gib']} GiB, {r['seconds']} s")
        lines.append(f"context: longest fit {c.get('longest_fit')} ({c.get('stopped')}) {c.get('error', '')}")
    g = results["goals"]["qlora_2048_peak_le_7gib"]
    verdict = "n/a" if g["pass"] is None else "PASS" if g["pass"] else "FAIL"
    lines.append(f"goal peak <= {GOAL_PEAK_GIB} GiB at 2048: {g['value_gib']} GiB -> {verdict}")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="Llama 3 tokenizer (smoke: any)")
    p.add_argument("--data", type=Path, required=True, help="alpaca_en_demo.json")
    p.add_argument("--out", type=Path, default=None, help="bench/results/qlora_memory-<UTC>.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: proves the code paths")
    p.add_argument("--work", type=Path, default=None, help="default /tmp/tunesmith-qlora-memory")
    p.add_argument("--phases", nargs="+", default=["train", "context"], choices=["train", "context"])
    p.add_argument("--template", default="llama3")
    p.add_argument("--steps", type=int, default=None, help="training steps (10; smoke 3)")
    p.add_argument("--cutoff-len", type=int, default=None, help="training cutoff_len (2048; smoke 256)")
    p.add_argument("--start-len", type=int, default=None, help="first context length (2048; smoke 64)")
    p.add_argument("--max-len", type=int, default=None, help="longest context tried (config max; smoke 256)")
    p.add_argument("--step", type=int, default=None, help="bisection granularity (1024; smoke 32)")
    p.add_argument("--max-bisect", type=int, default=4)
    p.add_argument("--fake-oom-above", type=int, default=None, help="L > N counts as OOM (tests)")
    p.add_argument("--time-limit-s", type=float, default=520.0, help="no try predicted to end later")
    p.add_argument("--train-timeout-s", type=float, default=300.0)
    p.add_argument("--tiled-mlp-tokens", type=int, default=None, help="tiled_mlp_tokens for both phases")
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    defaults = {"steps": (10, 3), "cutoff_len": (2048, 256), "start_len": (2048, 64),
                "max_len": (None, 256), "step": (1024, 32)}  # fmt: skip
    for key, (gpu, cpu) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, cpu if smoke else gpu)
    a.work = a.work or Path("/tmp/tunesmith-qlora-memory" + ("-smoke" if smoke else ""))
    return a


def settings(a: argparse.Namespace, model: Path, max_len: int) -> dict:
    """What each phase ran with, for the results file."""
    context = {
        "start_len": a.start_len, "max_len": max_len, "step": a.step, "max_bisect": a.max_bisect,
        "fake_oom_above": a.fake_oom_above, "batch": 1, "labels": "every position", "lora_rank": 8,
        "quantization_bit": None if a.cpu_smoke else 4, "tiled_mlp_tokens": a.tiled_mlp_tokens,
    }  # fmt: skip
    train = train_overrides(model, a.data, a.work, a)
    return {"train": train, "context": context, "time_limit_s": a.time_limit_s}


def main(argv: Sequence[str] | None = None) -> int:
    began = time.monotonic()
    a = parse(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.cpu_smoke:
        raise SystemExit("no CUDA GPU: this benchmark measures GPU memory (--cpu-smoke tests it on CPU)")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = a.out or REPO / "bench" / "results" / f"qlora_memory-{date.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    folder = a.work / ("llama-smoke" if a.cpu_smoke else "llama-3.1-8b-random")
    build = build_model(folder, a.tokenizer, a.cpu_smoke)
    max_len = a.max_len or build["config"]["max_position_embeddings"]
    results: dict[str, Any] = {
        "bench": "qlora_memory", "date": date, "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
        "device": device(), "versions": versions(),
        "model": "2-layer Llama (smoke)" if a.cpu_smoke else "Llama-3.1-8B architecture, random init, bf16",
        "published_config": None if a.cpu_smoke else LLAMA31_8B, "model_config": build.pop("config"),
        "build": build, "data": a.data.name, "settings": settings(a, Path(build["path"]), max_len),
        "note": SMOKE_NOTE if a.cpu_smoke else "peak = torch.cuda.max_memory_allocated",
        "train": None, "context": None,
    }  # fmt: skip
    write(results, out)
    if "train" in a.phases:
        results["train"] = run_train(results["settings"]["train"], a.train_timeout_s)
        write(results, out)
    if "context" in a.phases:
        results["context"] = {"tries": []}
        try:
            model, fused, facts = load_for_context(
                Path(build["path"]), quantize=not a.cpu_smoke, tiled_mlp_tokens=a.tiled_mlp_tokens
            )
            results["context"]["load"] = facts

            def on_try(tries: list[dict]) -> None:
                results["context"]["tries"] = tries
                write(results, out)

            def measure(n: int) -> dict:
                return try_length(model, fused, n, a.fake_oom_above)

            deadline = began + a.time_limit_s
            found = search_context(measure, a.start_len, max_len, a.step, a.max_bisect, deadline, on_try)
            results["context"].update(found)
        except Exception as e:  # the train phase's results stay written; say what stopped this one
            results["context"]["error"] = f"{type(e).__name__}: {e}"
        write(results, out)
    print(summary(results))
    print(f"wrote {out}")
    t = results["train"]
    train_ok = "train" not in a.phases or (t["exit_code"] == 0 and "error" not in t)
    context_ok = "context" not in a.phases or bool(results["context"].get("longest_fit"))
    return 0 if train_ok and context_ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    raise SystemExit(main())
