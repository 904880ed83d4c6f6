"""Whole-step CUDA graphs for the default LoRA step: do they run, and what do they save?

The default LoRA step (8 unpacked alpaca-length rows, about 1,200 tokens, laid back to back in one row for
varlen attention) is bound by the host: compiled, 0.1425 s a step for 19 ms of kernels on an H200, some
1,280 small matmuls and 1,040 Triton kernels launched one by one from Python
(results/profile_step_gpu-2026-11-28T1717Z-default-compile-h200.json). Inductor's own CUDA graphs
(`torch_compile_mode: reduce-overhead`) crash over per-layer compiled training, so this captures the
forward and backward by hand (`torch.cuda.graph`, static inputs) and replays it.

One fixed batch, the tunesmith step's parts (PEFT LoRA rank 8 on every linear layer, the varlen attention,
the fused loss head, AdamW, gradient clipping), four ways:
- eager; compiled (decoder layers compiled in place, as `torch_compile: true` does);
- eager_graph, compiled_graph: the same, with the forward + backward captured once and replayed each step
  (the optimizer and clipping stay outside the graph).
Reported per variant: ms per optimizer step (mean over --steps after warm-up, one sync at the end), peak
memory, the first step's loss and its gradients against eager's (relative L2 of a few LoRA weights'), and
the loss after the last step. Pass: every variant that ran agrees with eager within the tolerance; a
variant that fails to run is reported with its error, not hidden. Raw results: --out (JSON).

    python3 bench/cuda_graph_step.py --out $OUT/cuda_graph_step.json            # on the device
    python bench/cuda_graph_step.py --cpu-smoke --out /tmp/g.json               # code paths (no graphs)
"""

from __future__ import annotations

import argparse
import json
import random
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from train_gpu_smoke import QWEN25_05B, device, versions  # bench/ is on sys.path when run as a script

SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
VARIANTS = ("eager", "compiled", "eager_graph", "compiled_graph")
TOLERANCE = {"gpu": {"loss_rel": 1e-2, "grad_rel": 5e-2}, "cpu": {"loss_rel": 1e-5, "grad_rel": 1e-4}}
WATCHED = ("layers.0.self_attn.q_proj.lora_B", "layers.1.mlp.down_proj.lora_A")  # gradients compared


def rows_like_alpaca(rows: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """``rows`` unpacked rows of lo..hi random tokens, the first ~40% a prompt (labels -100)."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        n = rng.randint(lo, hi)
        ids = [rng.randrange(10, vocab) for _ in range(n)]
        prompt = max(1, int(0.4 * n))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def build(config: dict, dtype: Any, dev: Any, attn: str, compiled: bool) -> tuple[Any, list, Any]:
    """A fresh LoRA model (same seed every time), its trained parameters and AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunesmith.model.compile import compile_decoder_layers

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation=attn)).to(dev, dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give the gradients something to show
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    if compiled:
        compile_decoder_layers(model, backend="inductor")
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, **({"fused": True} if dev.type == "cuda" else {}))
    return model, trained, opt


def watched_grads(model: Any) -> dict[str, Any]:
    """Copies of the gradients of the WATCHED parameters (fp32)."""
    found = {
        key: p.grad.detach().float().clone()
        for name, p in model.named_parameters()
        for key in WATCHED
        if f".{key}." in name and name.endswith("default.weight") and p.grad is not None
    }
    if len(found) != len(WATCHED):
        raise RuntimeError(f"gradients of {sorted(set(WATCHED) - set(found))} not found")
    return found


def run_variant(name: str, a: argparse.Namespace, config: dict, batch: dict, dev: Any, dtype: Any) -> dict:
    """One variant: first-step loss and gradients, then timed optimizer steps on the same batch."""
    import torch

    from tunesmith.data.collate import LOSS_ROWS
    from tunesmith.model import varlen
    from tunesmith.training.fused_head import probe_fused_head

    cuda = dev.type == "cuda"
    attn = varlen.register(cuda=cuda, dtype=dtype, head_size=varlen.head_dim(_cfg(config)))
    compiled = name.startswith("compiled")
    model, trained, opt = build(config, dtype, dev, attn, compiled)
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels, rows = inputs.pop("labels"), inputs.pop(LOSS_ROWS)
    # as the trainer does: with torch_compile, the loss head's chunk math is compiled too
    head = probe_fused_head(model.get_base_model(), inputs, compile_backend="inductor" if compiled else None)
    if isinstance(head, str):
        raise RuntimeError(f"no fused head: {head}")

    def forward_backward() -> Any:
        total, n, _ = head.loss_sum(model, inputs, labels, rows=rows)
        loss = total / n
        loss.backward()
        return loss.detach()

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()

    if name.endswith("_graph"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compiling) off the capture stream, as torch asks
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)  # backward then allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = forward_backward()

        def fb() -> Any:
            graph.replay()  # rewrites the gradients in place: no zeroing, ever
            return static_loss

        def step() -> Any:
            loss = fb()
            update()
            return loss
    else:

        def fb() -> Any:
            opt.zero_grad(set_to_none=True)
            return forward_backward()

        def step() -> Any:
            loss = fb()
            update()
            return loss

    first_loss = float(fb())
    grads = watched_grads(model)
    update()
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        last = step()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / a.steps
    return {
        "ms_per_step": round(ms, 3),
        "first_loss": first_loss,
        "last_loss": float(last),
        "optimizer_steps": 1 + a.warmup + a.steps,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "_grads": grads,
    }


def _cfg(config: dict) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--rows", type=int, default=8, help="unpacked rows a step (the default batch)")
    p.add_argument("--row-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="row lengths (60 250: about 1,200 tokens a step like the alpaca default; smoke 8 24)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args(argv)

    import torch

    from tunesmith.data.collate import CausalLMCollator

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not cuda and not a.cpu_smoke:
        raise SystemExit("no CUDA GPU (--cpu-smoke checks the code paths on CPU)")
    mode = "gpu" if cuda else "cpu"
    variants = a.variants or (VARIANTS if cuda else ("eager", "compiled"))
    if not cuda and any(v.endswith("_graph") for v in variants):
        raise SystemExit("CUDA graphs need a GPU: leave the *_graph variants out with --cpu-smoke")
    dtype = torch.bfloat16 if cuda else torch.float32
    dev = torch.device("cuda" if cuda else "cpu")
    config = {k: v for k, v in QWEN25_05B.items() if k != "architectures"} | ({} if cuda else SMOKE_SHAPE)
    lo, hi = a.row_tokens or ((60, 250) if cuda else (8, 24))
    features = rows_like_alpaca(a.rows, config["vocab_size"], lo, hi)
    batch = CausalLMCollator(0, boundaries=True)(features)

    results: dict[str, dict] = {}
    for name in variants:
        try:
            results[name] = run_variant(name, a, config, batch, dev, dtype)
        except Exception as e:  # a variant that cannot run is a result too
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(
            json.dumps({name: {k: v for k, v in results[name].items() if not k.startswith("_")}}), flush=True
        )
        if cuda:
            torch.cuda.empty_cache()

    tol = TOLERANCE[mode]
    reference = results.get("eager", {})
    checks: dict[str, Any] = {"tolerance": tol, "against": "eager"}
    ok = "error" not in reference and bool(reference)
    grads_of = {name: r.pop("_grads", None) for name, r in results.items()}
    for name, r in results.items():
        if name == "eager" or "error" in r or not ok:
            continue
        loss_rel = abs(r["first_loss"] - reference["first_loss"]) / abs(reference["first_loss"])
        grad_rel = {
            k: float((g - grads_of["eager"][k]).norm() / grads_of["eager"][k].norm().clamp_min(1e-12))
            for k, g in grads_of[name].items()
        }
        passed = loss_rel <= tol["loss_rel"] and max(grad_rel.values()) <= tol["grad_rel"]
        last_rel = abs(r["last_loss"] - reference["last_loss"]) / abs(reference["last_loss"])
        checks[name] = {"first_loss_rel_diff": loss_rel, "grad_rel_l2_diff": grad_rel, "pass": passed,
                        "last_loss_rel_diff (information: bf16 rounding compounds over the steps)": last_rel}  # fmt: skip
        ok = ok and passed
    eager_ms = reference.get("ms_per_step")
    speed = {
        name: round(eager_ms / r["ms_per_step"], 3)
        for name, r in results.items()
        if eager_ms and r.get("ms_per_step")
    }
    checks["pass"] = ok
    out = {
        "bench": "cuda_graph_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode, "device": device(), "versions": versions(),
        "model": ("Qwen2.5-0.5B architecture, random init, bf16" if cuda else "2-layer Qwen2 (smoke), fp32")
                 + ", PEFT LoRA r=8 on every linear layer, varlen attention, fused loss head, fused AdamW",
        "batch": {"rows": a.rows, "tokens": int(batch["input_ids"].numel()),
                  "trained_tokens": int(batch["loss_rows"].numel()), "row_tokens": [lo, hi]},
        "variants": results, "speedup_vs_eager": speed, "checks": checks,
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({"speedup_vs_eager": speed, "pass": ok, "batch": out["batch"]}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
