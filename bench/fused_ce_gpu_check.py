"""The fused loss head with fp32 weights under bf16 autocast (full fine-tuning), on a GPU.

Times one forward+backward of `fused_ce`'s chunked head at Llama-3.2-1B's head shape (128,256 x 2,048, tied
fp32 weight, 12,000 supervised rows; ``--shape qwen``: Qwen2.5-0.5B's 151,936 x 896) several ways, in one
process:
- ``fp32``: the matmuls in the weight's dtype (what the head did before `compute_dtype`);
- ``autocast``: the matmuls in bf16, the weight gradient summed into fp32 (`compute_dtype`), each chunk's
  softmax and gradient in eager `softmax_grad` (``ChunkPlan(kernel=False)``);
- ``compiled``: ``autocast`` with each chunk's softmax and gradient compiled by inductor (what
  `torch_compile: true` runs, `fused_ce_chunk`; its compile happens in the untimed warm-up);
- ``triton``: ``autocast`` with each chunk's softmax and gradient in the Triton kernel (`fused_ce_triton`, the
  default on a GPU; its compile happens in the untimed warm-up; on --cpu-smoke it is left out unless
  TRITON_INTERPRET=1);
- ``plain``: F.linear under autocast and F.cross_entropy on the whole [rows x vocab] logits (the reference).
Guards: every fused variant's loss and gradients against the plain path (relative max error), the kernel's
against eager ``autocast``'s (``triton.vs_eager``), and whether cuBLAS's fp32-output addmm (``out_dtype``)
ran. ``lora_head``: a frozen bf16 head (LoRA: hidden-state gradients only) at its default chunk, eager
against the kernel: the case the kernel was written for. ``--chunk-rows N ...`` then times the autocast
variant (eager, and the kernel) at other chunk sizes, for a trained head (full SFT) and a frozen bf16 head
(LoRA: no weight gradient), with each chunk's transient memory: what sizing chunks by the memory at hand
would buy. Usage: python bench/fused_ce_gpu_check.py --out r.json (--cpu-smoke: small shapes on the CPU, to
prove the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


SHAPES = {"llama": (12_000, 2048, 128_256), "qwen": (12_000, 896, 151_936)}  # supervised rows, hidden, vocab


def _rel(a, b) -> float:
    """Max absolute difference relative to ``b``'s largest magnitude."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _timed(fn, iters: int, sync) -> tuple[float, object]:
    out = fn()  # warm-up (cuBLAS handles, allocator)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync()
    return (time.perf_counter() - t0) / iters, out


def main() -> int:
    import torch
    import torch.nn.functional as F

    from tunesmith.training.fused_ce import ChunkPlan, LogitTransform, _chunked, default_chunk_rows
    from tunesmith.training.fused_ce_triton import triton_ready

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--chunk-rows", type=int, nargs="*", default=[], help="also time these chunk sizes")
    p.add_argument(
        "--shape", choices=list(SHAPES), default="llama", help="the head: Llama-3.2-1B or Qwen2.5-0.5B"
    )
    a = p.parse_args()
    dev = "cpu" if a.cpu_smoke else "cuda"
    rows, hidden, vocab = (300, 64, 1000) if a.cpu_smoke else SHAPES[a.shape]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(rows, hidden, device=dev, generator=g) * 0.5).bfloat16()
    w = torch.randn(vocab, hidden, device=dev, generator=g) * 0.02
    t = torch.randint(0, vocab, (rows,), device=dev, generator=g)
    chunk = default_chunk_rows(vocab, trained=True)  # w's gradient is taken
    results: dict = {"bench": "fused_ce_gpu_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                     "shape": {"rows": rows, "hidden": hidden, "vocab": vocab, "chunk_rows": chunk}}  # fmt: skip
    if dev == "cuda":
        try:
            acc = torch.zeros(8, 8, device=dev)
            torch.addmm(acc, h[:8, :16], h[:16, :8], out_dtype=torch.float32, out=acc)
            results["addmm_out_dtype"] = True
        except (TypeError, RuntimeError) as e:
            results["addmm_out_dtype"] = f"unavailable: {e}"

    def fused(plan):
        def step():
            # no autocast and no autograd, as in the trainer (the loss runs after the model's autocast
            # forward, inside its autograd Function's forward)
            with torch.no_grad():
                return _chunked(h, w, None, t, None, LogitTransform(), plan, (True, True, False))

        return step

    def plain():
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = F.cross_entropy(F.linear(hh, ww).float(), t, reduction="sum")
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    ref_s, (ref_loss, ref_h, ref_w) = _timed(plain, a.iters, sync)
    results["plain"] = {"s": round(ref_s, 5)}
    variants = {
        "fp32": ChunkPlan(chunk, torch.float32, kernel=False),
        "autocast": ChunkPlan(chunk, torch.bfloat16, kernel=False),
        "compiled": ChunkPlan(chunk, torch.bfloat16, "inductor"),
    }
    if triton_ready(h):
        variants["triton"] = ChunkPlan(chunk, torch.bfloat16)
    else:
        results["triton"] = "unavailable: triton is not installed (or, on the CPU, TRITON_INTERPRET is not 1)"
    outs = {}
    for name, plan in variants.items():
        secs, outs[name] = _timed(fused(plan), a.iters, sync)
        loss, _, grad_h, grad_w, _ = outs[name]
        results[name] = {
            "s": round(secs, 5),
            "loss_rel": float((loss - ref_loss).abs() / ref_loss.abs()),
            "grad_h_rel": _rel(grad_h, ref_h),
            "grad_w_rel": _rel(grad_w, ref_w),
            "grad_w_dtype": str(grad_w.dtype),
        }
        if name == "triton":  # the same bf16 matmuls as eager autocast: only the chunk math differs
            eager = outs["autocast"]
            results[name]["vs_eager"] = {
                "loss_rel": float((loss - eager[0]).abs() / eager[0].abs()),
                "grad_h_rel": _rel(grad_h, eager[2]),
                "grad_w_rel": _rel(grad_w, eager[3]),
            }
        print(name, json.dumps(results[name]), flush=True)
    results["speedup_autocast_vs_fp32"] = round(results["fp32"]["s"] / results["autocast"]["s"], 2)
    results["speedup_compiled_vs_autocast"] = round(results["autocast"]["s"] / results["compiled"]["s"], 2)
    if "triton" in variants:
        results["speedup_triton_vs_autocast"] = round(results["autocast"]["s"] / results["triton"]["s"], 2)
        results["speedup_triton_vs_compiled"] = round(results["compiled"]["s"] / results["triton"]["s"], 2)
    frozen = w.bfloat16()  # a LoRA run's head: bf16, no gradient
    maths = {"eager": False, **({"triton": True} if "triton" in variants else {})}  # ChunkPlan's kernel

    def head_step(weight, want, n, kernel):
        return lambda: _chunked(
            h, weight, None, t, None, LogitTransform(), ChunkPlan(n, torch.bfloat16, kernel=kernel), want
        )

    lora_rows = default_chunk_rows(vocab)
    results["lora_head"] = {"chunk_rows": lora_rows}
    for math, kernel in maths.items():
        secs, out = _timed(head_step(frozen, (True, False, False), lora_rows, kernel), a.iters, sync)
        results["lora_head"][math] = {"s": round(secs, 5), "grad_h_rel": _rel(out[2], ref_h)}
    print("lora_head", json.dumps(results["lora_head"]), flush=True)
    sweeps = {"eager": "chunk_sweep", "triton": "chunk_sweep_triton"}  # the first key as before the kernel
    for math in maths:
        results[sweeps[math]] = []
    for rows_a_chunk in a.chunk_rows:
        for head, weight, want in (
            ("trained", w, (True, True, False)),
            ("frozen", frozen, (True, False, False)),
        ):
            for math, kernel in maths.items():
                secs, _ = _timed(head_step(weight, want, rows_a_chunk, kernel), a.iters, sync)
                cell = {"head": head, "chunk_rows": rows_a_chunk, "s": round(secs, 5),
                        "chunk_mib": round(rows_a_chunk * vocab * 8 / 2**20)}  # fmt: skip
                results[sweeps[math]].append(cell)
                print(sweeps[math], json.dumps(cell), flush=True)
    ok = all(
        max(results[k]["grad_w_rel"], results[k]["grad_h_rel"]) < 2e-2 and results[k]["loss_rel"] < 1e-3
        for k in variants
    )
    if "triton" in variants:
        vs = results["triton"]["vs_eager"]
        ok = ok and max(vs["grad_w_rel"], vs["grad_h_rel"]) < 1e-2 and vs["loss_rel"] < 1e-5
        ok = ok and results["lora_head"]["triton"]["grad_h_rel"] < 2e-2
    results["guard"] = "PASS" if ok else "FAIL"
    print(json.dumps({k: v for k, v in results.items() if k not in variants}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
