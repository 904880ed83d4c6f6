"""Causal varlen attention kernels side by side on the document layouts of real packed training steps.

The baseline is what `flash_attn: varlen` runs: PyTorch's own flash-attention varlen kernel (FlashAttention-2),
through `tunesmith.model.varlen.flash_varlen`. The candidates, each where this machine has it:
- `cudnn`: cuDNN's ragged attention (`torch.ops.aten._cudnn_attention_forward/backward` with cumulative
  lengths); it takes no grouped KV heads, so K and V are repeated per query head, and that copy is timed too;
- `flex`: compiled `flex_attention` with a block mask of the documents (grouped heads native); the mask,
  built once per step for all layers, is timed apart;
- `fa4`: FlashAttention-4's CuTe kernels (`flash_attn.cute`, package flash-attn-4), with SM90 kernels.

Every step is --rows-per-step packed rows put back to back, as the collator sends them, with the document
lengths from --layout (`rows_seq_lens`: one list of lengths per packed row). Per kernel: milliseconds per
layer call, forward and backward (CUDA events, after warm-up, summed over the steps), TFLOP/s on causal
flops (forward 4·H·D·L²/2 per document; backward 2.5× forward), and the largest difference of the output and
of dq/dk/dv from the baseline, over the largest baseline value (pass: under 2e-2, bf16).

    python3 bench/attention_kernels.py --layout .device/llama_mix_layout.json --heads 32 --kv-heads 8 \
        --kernels fa2 cudnn flex fa4 --out $OUT/attention_kernels.json
"""

from __future__ import annotations

import argparse
import json
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from train_gpu_smoke import device, versions  # bench/ is on sys.path when run as a script

TOL = 2e-2


def steps_of(layout: dict, rows_per_step: int, steps: int) -> list[list[int]]:
    """Document lengths of each step: rows_per_step consecutive packed rows, back to back."""
    rows = layout["rows_seq_lens"]
    out = []
    for i in range(steps):
        chunk = rows[i * rows_per_step : (i + 1) * rows_per_step]
        if len(chunk) < rows_per_step:
            break
        out.append([n for r in chunk for n in r])
    return out


def causal_flops(docs: list[int], heads: int, head_dim: int) -> tuple[float, float]:
    fwd = sum(4.0 * heads * head_dim * n * n / 2 for n in docs)
    return fwd, 2.5 * fwd


def fa2(heads: int, kv_heads: int, head_dim: int):
    from torch.nn.attention.varlen import varlen_attn

    from tunesmith.model.varlen import KernelApi, flash_varlen

    api = KernelApi.of(varlen_attn)
    return lambda q, k, v, cu, max_len, ctx: flash_varlen(q, k, v, cu, max_len, head_dim**-0.5, None, api)


class _Cudnn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        r = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale
        )
        out, lse, seed, offset = r[0], r[1], r[6], r[7]
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed, offset, cu = ctx.saved_tensors
        m = ctx.max_len
        args = (dout.contiguous(), q, k, v, out, lse, seed, offset)
        try:  # the schema types attn_bias as a Tensor; torch's own callers pass an undefined one
            grads = torch.ops.aten._cudnn_attention_backward(
                *args, None, cu, cu, m, m, 0.0, True, scale=ctx.scale
            )
        except (TypeError, RuntimeError):
            grads = torch.ops.aten._cudnn_attention_backward(
                *args, torch.Tensor(), cu, cu, m, m, 0.0, True, scale=ctx.scale
            )
        return *grads, None, None, None


def cudnn(heads: int, kv_heads: int, head_dim: int):
    g = heads // kv_heads

    def run(q, k, v, cu, max_len, ctx):
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return _Cudnn.apply(q, k, v, cu, max_len, head_dim**-0.5)

    return run


def flex(heads: int, kv_heads: int, head_dim: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attend = torch.compile(flex_attention, dynamic=False)

    def prepare(docs: list[int]):
        doc = torch.repeat_interleave(
            torch.arange(len(docs), device="cuda"), torch.tensor(docs, device="cuda")
        )

        def mask(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        n = sum(docs)
        return create_block_mask(mask, None, None, n, n, device="cuda")

    def run(q, k, v, cu, max_len, ctx):
        o = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=ctx,
                   scale=head_dim**-0.5, enable_gqa=kv_heads != heads)  # fmt: skip
        return o[0].transpose(0, 1)

    run.prepare = prepare
    return run


def fa4(heads: int, kv_heads: int, head_dim: int):
    from flash_attn.cute.interface import flash_attn_varlen_func

    def run(q, k, v, cu, max_len, ctx):
        o = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                   max_seqlen_k=max_len, softmax_scale=head_dim**-0.5, causal=True)  # fmt: skip
        return o[0] if isinstance(o, tuple) else o

    return run


def fa4_version() -> str | None:
    from tunesmith.model import fa4 as tunesmith_fa4

    return tunesmith_fa4.version() if tunesmith_fa4.unusable() is None else None


KERNELS = {"fa2": fa2, "cudnn": cudnn, "flex": flex, "fa4": fa4}


def inputs(docs: list[int], heads: int, kv_heads: int, head_dim: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(docs)
    mk = lambda h: torch.randn(n, h, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v, dout = mk(heads), mk(kv_heads), mk(kv_heads), mk(heads)
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(docs, device="cuda").cumsum(0)
    return q, k, v, dout, cu, max(docs)


def call(run, q, k, v, dout, cu, max_len, ctx):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = run(q, k, v, cu, max_len, ctx)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def timed(run, q, k, v, dout, cu, max_len, ctx, iters: int) -> tuple[float, float]:
    """Median forward and backward milliseconds of one layer call."""
    fw, bw = [], []
    for _ in range(iters):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        e[0].record()
        out = run(qq, kk, vv, cu, max_len, ctx)
        e[1].record()
        out.backward(dout)
        e[2].record()
        torch.cuda.synchronize()
        fw.append(e[0].elapsed_time(e[1]))
        bw.append(e[1].elapsed_time(e[2]))
    fw.sort(), bw.sort()
    return fw[len(fw) // 2], bw[len(bw) // 2]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", type=Path, required=True)
    ap.add_argument("--rows-per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers, for the per-step totals")
    ap.add_argument("--kernels", nargs="+", default=["fa2", "cudnn", "flex", "fa4"], choices=list(KERNELS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    layout = json.loads(a.layout.read_text())
    steps = steps_of(layout, a.rows_per_step, a.steps)
    shape = (a.heads, a.kv_heads, a.head_dim)
    result = {"bench": "attention_kernels", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device(), "versions": {**versions(), "flash-attn-4": fa4_version()}, "layout": layout.get("data", str(a.layout)),
              "shape": {"heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "layers": a.layers,
                        "rows_per_step": a.rows_per_step},
              "steps": [{"tokens": sum(d), "documents": len(d), "max_len": max(d)} for d in steps],
              "kernels": {}}  # fmt: skip
    refs = []  # fa2's outputs and gradients per step: it runs first, as the others' reference
    for name in ["fa2", *(k for k in a.kernels if k != "fa2")]:
        rec: dict = {"ms_fwd": 0.0, "ms_bwd": 0.0, "flops_fwd": 0.0, "flops_bwd": 0.0, "max_rel_diff": {}}
        try:
            run = KERNELS[name](*shape)
            for i, docs in enumerate(steps):
                q, k, v, dout, cu, max_len = inputs(docs, *shape, seed=i)
                prep = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                prep[0].record()
                ctx = run.prepare(docs) if hasattr(run, "prepare") else None
                prep[1].record()
                got = call(run, q, k, v, dout, cu, max_len, ctx)  # warm-up (compiles), and the numbers
                torch.cuda.synchronize()
                if hasattr(run, "prepare"):
                    ms = prep[0].elapsed_time(prep[1])
                    rec["ms_prepare_per_step"] = rec.get("ms_prepare_per_step", 0.0) + ms
                if name == "fa2":
                    refs.append(got)
                else:
                    for label, x, r in zip(("out", "dq", "dk", "dv"), got, refs[i]):
                        rec["max_rel_diff"][label] = max(rec["max_rel_diff"].get(label, 0.0), rel_diff(x, r))
                f, b = timed(run, q, k, v, dout, cu, max_len, ctx, a.iters)
                ff, fb = causal_flops(docs, a.heads, a.head_dim)
                rec["ms_fwd"] += f
                rec["ms_bwd"] += b
                rec["flops_fwd"] += ff
                rec["flops_bwd"] += fb
            n = len(steps)
            rec["tflops_fwd"] = rec["flops_fwd"] / (rec["ms_fwd"] * 1e-3) / 1e12
            rec["tflops_bwd"] = rec["flops_bwd"] / (rec["ms_bwd"] * 1e-3) / 1e12
            rec["ms_per_layer_call"] = {"fwd": rec["ms_fwd"] / n, "bwd": rec["ms_bwd"] / n}
            rec["ms_per_step_all_layers"] = (rec["ms_fwd"] + rec["ms_bwd"]) / n * a.layers
            if name != "fa2":
                rec["pass"] = all(d < TOL for d in rec["max_rel_diff"].values())
        except Exception as e:  # a kernel this machine lacks, or one that fails: recorded, the others go on
            rec = {
                "error": f"{type(e).__name__}: {str(e)[:500]}",
                "traceback": traceback.format_exc()[-2000:],
            }
        result["kernels"][name] = rec
        print(
            name,
            json.dumps({k: v for k, v in rec.items() if k != "traceback"}, default=str)[:600],
            flush=True,
        )
    base = result["kernels"]["fa2"].get("ms_per_step_all_layers")
    for rec in result["kernels"].values():
        if base and rec.get("ms_per_step_all_layers"):
            rec["speedup_vs_fa2"] = base / rec["ms_per_step_all_layers"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
