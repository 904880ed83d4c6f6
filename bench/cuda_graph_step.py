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
  (the optimizer and clipping stay outside the graph), the gradients allocated in the graph's pool;
- eager_graph_inplace, compiled_graph_inplace: the gradients allocated before the capture and zeroed before
  each replay, which accumulates into them in place (no gradient copy in the pool: the trainer's candidate).
- eager_fusedlora, eager_graph_inplace_fusedlora: the trainer's LoRA layers (model/lora_fused.py, fused
  while captured), the eager one running the same fused math eagerly (`fuse_eagerly`: the graph's twin; the
  trainer runs PEFT's layers eagerly, which `eager` times); with _fusednorm, every RMSNorm as torch's rms_norm (model/fused_norm.py);
  with _fusedlayers, that and the MLP's SwiGLU kernel (model/fused_layers.py, the trainer's default on a
  GPU); with --mixed, as the trainer runs.
Reported per variant: ms per optimizer step (mean over --steps after warm-up, one sync at the end), peak
memory, optimizer steps taken (counted from AdamW's state), compiled decoder layers, the first step's loss and
its gradients (relative L2 of a few LoRA weights'), and the loss after the last step. Checks: every variant
against eager (compiling may move bf16 numbers a little); each graph variant against its twin without the
graph, tightly (same kernels: a replay must give the same numbers, step 1 and after the last step). Each
variant runs in its own process, so one that crashes (the last CUDA graph attempt segfaulted) is reported
with its exit code and output, and the results so far are written after every variant. Exit 0: all ran and
pass; 1: a check failed; 2: a variant did not run. Raw results: --out (JSON).

    PYTHONPATH=src python3 bench/cuda_graph_step.py --out $OUT/cuda_graph_step.json   # on the device
    python bench/cuda_graph_step.py --cpu-smoke --out /tmp/g.json                     # code paths (no graphs)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # tunesmith from this checkout

from train_gpu_smoke import QWEN25_05B, device, versions  # bench/ is on sys.path when run as a script

SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
VARIANTS = (
    "eager",
    "compiled",
    "eager_graph",
    "compiled_graph",
    "eager_graph_inplace",
    "compiled_graph_inplace",
    "eager_fusedlora",  # model/lora_fused.py (the trainer's LoRA layers): PEFT's eagerly, fused while captured
    "eager_graph_inplace_fusedlora",
    # model/fused_norm.py alone (every RMSNorm as torch's rms_norm times its weight), and model/fused_layers.py
    # (that and model/fused_swiglu.py's MLP kernel): the trainer's default on a GPU
    "eager_fusedlora_fusednorm",
    "eager_graph_inplace_fusedlora_fusednorm",
    "eager_fusedlora_fusedlayers",
    "eager_graph_inplace_fusedlora_fusedlayers",
)
TOLERANCE = {"gpu": {"loss_rel": 1e-2, "grad_rel": 5e-2}, "cpu": {"loss_rel": 1e-5, "grad_rel": 1e-4}}
# a graph variant against its twin: the same kernels, replayed (flash-attention's backward sums with atomics)
TWIN_TOLERANCE = {"loss_rel": 1e-3, "grad_rel": 1e-2, "last_loss_rel": 1e-3}
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


def build(
    config: dict, dtype: Any, dev: Any, attn: str, compiled: bool, fused_lora: bool = False,
    fused: str | None = None, graphed: bool = False,
) -> tuple[Any, list, Any, int]:  # fmt: skip
    """A fresh LoRA model (same seed every time), its trained parameters, AdamW and its compiled layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunesmith.model.compile import compile_decoder_layers
    from tunesmith.model.fused_layers import fuse_layers
    from tunesmith.model.fused_norm import fuse_rms_norms
    from tunesmith.model.lora_fused import FusedLoraLinear, register_fused_lora

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation=attn)).to(dev, dtype)
    if fused == "norm" and not fuse_rms_norms(base).swapped:
        raise RuntimeError("no RMSNorm module swapped")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    if fused_lora:
        register_fused_lora(lora)
    model = get_peft_model(base, lora)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give the gradients something to show
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if fused_lora and not graphed:  # the graph variant's twin: the same fused layers, run eagerly
        for module in model.modules():
            if isinstance(module, FusedLoraLinear):
                module.fuse_eagerly = True
    if fused == "layers":  # as the trainer: after the adapters, before compiling
        done = fuse_layers(model)
        if done is None or not done.norms or not done.mlps or not done.attentions:
            raise RuntimeError(f"fused layers not taken: {done.describe() if done else 'off'}")
    model.train()
    layers = compile_decoder_layers(model, backend="inductor") if compiled else 0
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, **({"fused": True} if dev.type == "cuda" else {}))
    return model, trained, opt, layers


def watched_grads(model: Any) -> dict[str, Any]:
    """Copies of the gradients of the WATCHED parameters (fp32)."""
    found = {
        key: p.grad.detach().float().cpu().clone()
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
    from transformers import Qwen2Config

    from tunesmith.data.collate import LOSS_ROWS
    from tunesmith.model import varlen
    from tunesmith.training.fused_head import probe_fused_head
    from tunesmith.training.lora_casting import inputs_uncast, layers_to_uncast

    cuda = dev.type == "cuda"
    attn = varlen.register(cuda=cuda, dtype=dtype, head_size=varlen.head_dim(Qwen2Config(**config)))
    compiled = name.startswith("compiled")
    model, trained, opt, layers = build(
        config, dtype, dev, attn, compiled, "_fusedlora" in name,
        "norm" if "_fusednorm" in name else "layers" if "_fusedlayers" in name else None, "_graph" in name,
    )  # fmt: skip
    uncast = layers_to_uncast(model, autocast=a.mixed, engine=False)
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels, rows = inputs.pop("labels"), inputs.pop(LOSS_ROWS)
    # as the trainer does: with torch_compile, the loss head's chunk math is compiled too
    head = probe_fused_head(model.get_base_model(), inputs, compile_backend="inductor" if compiled else None)
    if isinstance(head, str):
        raise RuntimeError(f"no fused head: {head}")

    def forward_backward() -> Any:
        # --mixed: as the trainer runs a bf16 LoRA step: autocast, the LoRA inputs left in bf16
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.mixed), inputs_uncast(uncast):
            total, n, _ = head.loss_sum(model, inputs, labels, rows=rows)
        loss = total / n
        loss.backward()
        return loss.detach()

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()

    if "_graph" in name:
        inplace = "_inplace" in name
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compiling) off the capture stream, as torch asks
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        # pool: backward allocates the gradients in the graph's pool; inplace: it adds into ours
        opt.zero_grad(set_to_none=not inplace)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = forward_backward()

        def fb() -> Any:
            if inplace:
                opt.zero_grad(set_to_none=False)
            graph.replay()  # pool: rewrites the gradients, no zeroing
            return static_loss
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
        "optimizer_steps": int(opt.state[trained[0]]["step"]),
        "compiled_layers": layers,
        "head_compile_backend": head.compile_backend,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        # the graph's pool is allocated before the peak is reset: what is reserved counts it
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 3) if cuda else None,
        "_grads": grads,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--rows", type=int, default=8, help="unpacked rows a step (the default batch)")
    p.add_argument("--row-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="row lengths (60 250: about 1,200 tokens a step like the alpaca default; smoke 8 24)")  # fmt: skip
    p.add_argument("--mixed", action="store_true",
                   help="as the trainer: fp32 adapters under bf16 autocast, LoRA inputs left in bf16")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variant-timeout", type=float, default=900, help="seconds for one variant's process")
    p.add_argument("--crash-variant", choices=VARIANTS, default=None,
                   help="tests only: that variant's process aborts at its start (the failure path)")  # fmt: skip
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # one variant's process
    p.add_argument("--part", type=Path, default=None, help=argparse.SUPPRESS)  # where the child saves it
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return a


def setup(a: argparse.Namespace) -> tuple[bool, Any, Any, dict, dict, tuple[int, int]]:
    """(cuda, device, dtype, model config, the batch, row lengths): the same in every process."""
    import torch

    from tunesmith.data.collate import CausalLMCollator

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dtype = torch.bfloat16 if cuda else torch.float32
    dev = torch.device("cuda" if cuda else "cpu")
    config = {k: v for k, v in QWEN25_05B.items() if k != "architectures"} | ({} if cuda else SMOKE_SHAPE)
    lo, hi = a.row_tokens or ((60, 250) if cuda else (8, 24))
    batch = CausalLMCollator(0, boundaries=True)(rows_like_alpaca(a.rows, config["vocab_size"], lo, hi))
    return cuda, dev, dtype, config, batch, (lo, hi)


def child(a: argparse.Namespace) -> int:
    """One variant in this process: its result (gradients as tensors) saved to --part."""
    import torch

    if a.child == a.crash_variant:
        os.abort()
    _, dev, dtype, config, batch, _ = setup(a)
    try:
        result = run_variant(a.child, a, config, batch, dev, dtype)
    except Exception as e:  # a variant that cannot run is a result too
        cause = f" (caused by {e.__context__!r})" if e.__context__ is not None else ""
        result = {"error": f"{type(e).__name__}: {e}{cause}", "traceback": traceback.format_exc()[-3000:]}
    torch.save(result, a.part)
    return 0


def spawn(name: str, a: argparse.Namespace, argv: list[str], part: Path) -> dict:
    """Run one variant in its own process; a crash or timeout becomes an error entry with the output's tail."""
    import torch

    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name, "--part", str(part)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.variant_timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or "")[-1500:] if isinstance(e.stdout, str) else ""
        return {"error": f"timed out after {a.variant_timeout:.0f} s", "output_tail": tail}
    if proc.returncode != 0 or not part.exists():
        return {
            "error": f"the variant's process exited with {proc.returncode}",
            "output_tail": (proc.stdout + proc.stderr)[-3000:],
        }
    return torch.load(part, weights_only=False)


def rel(x: float, y: float) -> float:
    return abs(x - y) / max(abs(y), 1e-12)


def grad_rel(grads: dict, reference: dict) -> dict[str, float]:
    return {
        k: float((g - reference[k]).norm() / reference[k].norm().clamp_min(1e-12)) for k, g in grads.items()
    }


def compare(results: dict[str, dict], grads_of: dict[str, dict], tol: dict) -> dict[str, Any]:
    """Every variant against eager; every graph variant against its twin (tightly)."""
    checks: dict[str, Any] = {"tolerance": tol, "twin_tolerance": TWIN_TOLERANCE}
    ran = {name for name, r in results.items() if "error" not in r}
    for name in sorted(ran - {"eager"}):
        r = results[name]
        entry: dict[str, Any] = {}
        if "eager" in ran:
            e = results["eager"]
            g = grad_rel(grads_of[name], grads_of["eager"])
            entry["vs_eager"] = {
                "first_loss_rel_diff": rel(r["first_loss"], e["first_loss"]),
                "grad_rel_l2_diff": g,
                "last_loss_rel_diff (information: bf16 rounding compounds over the steps)": rel(
                    r["last_loss"], e["last_loss"]
                ),
                "pass": rel(r["first_loss"], e["first_loss"]) <= tol["loss_rel"]
                and max(g.values()) <= tol["grad_rel"],
            }
        twin = name.replace("_graph_inplace", "").replace("_graph", "")
        if "_graph" in name and twin in ran:
            t = results[twin]
            g = grad_rel(grads_of[name], grads_of[twin])
            d = {
                "first_loss_rel_diff": rel(r["first_loss"], t["first_loss"]),
                "grad_rel_l2_diff": g,
                "last_loss_rel_diff": rel(r["last_loss"], t["last_loss"]),
            }
            d["pass"] = (
                d["first_loss_rel_diff"] <= TWIN_TOLERANCE["loss_rel"]
                and max(g.values()) <= TWIN_TOLERANCE["grad_rel"]
                and d["last_loss_rel_diff"] <= TWIN_TOLERANCE["last_loss_rel"]
            )
            entry[f"vs_{twin}"] = d
        entry["pass"] = all(v["pass"] for v in entry.values() if isinstance(v, dict))
        checks[name] = entry
    return checks


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.child:
        return child(a)
    import torch

    if not torch.cuda.is_available() and not a.cpu_smoke:
        raise SystemExit("no CUDA GPU (--cpu-smoke checks the code paths on CPU)")
    cuda, _, _, _, batch, (lo, hi) = setup(a)
    mode = "gpu" if cuda else "cpu"
    variants = a.variants or (VARIANTS if cuda else ("eager", "compiled"))
    if not cuda and any("_graph" in v for v in variants):
        raise SystemExit("CUDA graphs need a GPU: leave the *_graph variants out with --cpu-smoke")
    out = {
        "bench": "cuda_graph_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode, "device": device(), "versions": versions(),
        "model": ("Qwen2.5-0.5B architecture, random init, bf16" if cuda else "2-layer Qwen2 (smoke), fp32")
                 + ", PEFT LoRA r=8 on every linear layer, varlen attention, fused loss head, AdamW"
                 + (", fp32 adapters under bf16 autocast (--mixed, as the trainer)" if a.mixed else ""),
        "batch": {"rows": a.rows, "tokens": int(batch["input_ids"].numel()),
                  "trained_tokens": int(batch["loss_rows"].numel()), "row_tokens": [lo, hi]},
        "variants": {},
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = out["variants"]
    grads_of: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            r = spawn(name, a, argv, Path(tmp) / f"{name}.pt")
            grads_of[name] = r.pop("_grads", None)
            results[name] = r
            print(json.dumps({name: r}), flush=True)
            a.out.write_text(json.dumps(out, indent=1))  # what ran so far survives a later crash
    checks = compare(results, grads_of, TOLERANCE[mode])
    failed = [name for name, r in results.items() if "error" in r]
    checks["failed_to_run"] = failed
    checks["pass"] = all(v["pass"] for v in checks.values() if isinstance(v, dict) and "pass" in v)
    eager_ms = results.get("eager", {}).get("ms_per_step")
    out["speedup_vs_eager"] = {
        name: round(eager_ms / r["ms_per_step"], 3)
        for name, r in results.items()
        if eager_ms and r.get("ms_per_step")
    }
    out["checks"] = checks
    a.out.write_text(json.dumps(out, indent=1))
    print(
        json.dumps(
            {"speedup_vs_eager": out["speedup_vs_eager"], "pass": checks["pass"], "failed_to_run": failed}
        )
    )
    return 2 if failed else (0 if checks["pass"] else 1)


if __name__ == "__main__":
    raise SystemExit(main())
