"""flash_attn: varlen on the GPU: the same loss and gradients as SDPA on packed rows, and how fast.

One model (Qwen2.5-0.5B architecture, random init, bf16; --cpu-smoke: a 2-layer model in fp32) trains on
the same packed batch twice: with SDPA (transformers' dense block-diagonal mask from the position ids)
and with tunesmith's varlen attention (PyTorch's flash varlen kernel per document; on CPU its per-document
SDPA reference). Reported: the mean next-token loss of both, the largest logit difference over the largest
logit, the relative L2 difference of a few weights' gradients, and milliseconds per forward + backward
(median of --iters after warm-up) with the speed ratio, for the whole model (every weight trained, full
logits) and for the decoder alone as a LoRA step runs it (no weight gradients, no logits). Pass: loss within 1e-2 (bf16) and gradients
within 5e-2. Raw results: --out (JSON).

    python3 bench/varlen_gpu_check.py --out $OUT/varlen_gpu_check.json     # on the device
    python bench/varlen_gpu_check.py --cpu-smoke --out /tmp/v.json          # code paths only
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from train_gpu_smoke import QWEN25_05B, device, versions  # bench/ is on sys.path when run as a script

SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
TOLERANCE = {"gpu": {"loss_rel": 1e-2, "grad_rel": 5e-2}, "cpu": {"loss_rel": 1e-5, "grad_rel": 1e-4}}


def packed_features(rows: int, width: int, vocab: int, seed: int = 0) -> list[dict]:
    """Rows of back-to-back random documents (32..width/2 tokens) with restarting positions, to ``width``."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        ids: list[int] = []
        pos: list[int] = []
        while len(ids) < width:
            n = min(rng.randint(32, max(33, width // 2)), width - len(ids))
            ids += [rng.randrange(10, vocab) for _ in range(n)]
            pos += list(range(n))
        labels = [-100 if p == 0 else t for t, p in zip(ids, pos)]  # a document's first label: never a target
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def step(model, batch: dict, params: dict) -> tuple[float, dict]:
    """Mean next-token loss of the batch and the gradients of ``params`` (name -> parameter)."""
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_rows")}
    logits = model(**inputs).logits[:, :-1].float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().float().clone() for n, p in params.items()}


def decoder_step(model, batch: dict) -> None:
    """The decoder's forward + backward as a LoRA step runs it: activation gradients through every layer, no
    weight gradients but layer 0's q_proj (frozen elsewhere by the caller), no logits. Attention is a large
    share of this, so its timing shows what the attention kernel changes."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_rows", "use_cache")}
    hidden = model.model(**inputs).last_hidden_state
    hidden.float().square().mean().backward()


def timed(fn, iters: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after two warm-up calls."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--rows", type=int, default=None, help="packed rows (8; smoke 2)")
    p.add_argument("--width", type=int, default=None, help="tokens a row (2048; smoke 128)")
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()

    import torch
    from torch.nn.attention.varlen import varlen_attn
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunesmith.data.collate import CausalLMCollator
    from tunesmith.model import varlen

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not cuda and not a.cpu_smoke:
        raise SystemExit("no CUDA GPU (--cpu-smoke checks the code paths on CPU)")
    mode = "gpu" if cuda else "cpu"
    rows, width = a.rows or (8 if cuda else 2), a.width or (2048 if cuda else 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = {k: v for k, v in QWEN25_05B.items() if k != "architectures"} | ({} if cuda else SMOKE_SHAPE)
    torch.manual_seed(0)
    dev = torch.device("cuda" if cuda else "cpu")
    model = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation="sdpa")).to(dev, dtype)
    model.train()
    name = varlen.register(cuda=cuda, dtype=dtype)
    features = packed_features(rows, width, config["vocab_size"])
    plain = CausalLMCollator(0)(features)
    bounded = CausalLMCollator(0, boundaries=True)(features)
    to_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in plain.items()}
    to_dev_b = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in bounded.items()}
    layers = model.model.layers
    params = {"layer0.q_proj": layers[0].self_attn.q_proj.weight, "layer0.o_proj": layers[0].self_attn.o_proj.weight,
              "last.down_proj": layers[-1].mlp.down_proj.weight}  # fmt: skip

    def logits(batch: dict) -> torch.Tensor:
        """On the CPU: two [tokens x vocab] fp32 copies kept on the GPU ran an H100 out of memory."""
        with torch.no_grad():
            return (
                model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_rows")})
                .logits.cpu()
                .float()
            )

    loss_sdpa, grads_sdpa = step(model, to_dev, params)
    logits_sdpa = logits(to_dev)
    ms_sdpa = timed(lambda: step(model, to_dev, params), a.iters, cuda)
    model.set_attn_implementation(name)
    loss_v, grads_v = step(model, to_dev_b, params)
    logits_v = logits(to_dev_b).view_as(logits_sdpa)  # the rows came back to back in one row
    ms_v = timed(lambda: step(model, to_dev_b, params), a.iters, cuda)
    # the decoder alone, LoRA-like (one small weight trains), with either kernel
    for w in model.parameters():
        w.requires_grad_(w is params["layer0.q_proj"])
    ms_dec_v = timed(lambda: decoder_step(model, to_dev_b), a.iters, cuda)
    model.set_attn_implementation("sdpa")
    ms_dec_sdpa = timed(lambda: decoder_step(model, to_dev), a.iters, cuda)

    grad_rel = {n: float((grads_v[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in grads_sdpa.items()}
    tol = TOLERANCE[mode]
    checks = {
        "loss_sdpa": loss_sdpa,
        "loss_varlen": loss_v,
        "loss_rel_diff": abs(loss_v - loss_sdpa) / abs(loss_sdpa),
        "logits_max_diff_over_max_logit": float(
            (logits_v - logits_sdpa).abs().max() / logits_sdpa.abs().max()
        ),
        "grad_rel_l2_diff": grad_rel,
        "tolerance": tol,
    }
    checks["pass"] = checks["loss_rel_diff"] <= tol["loss_rel"] and max(grad_rel.values()) <= tol["grad_rel"]
    docs = len(bounded["cu_seq_lens_q"]) - 1
    results = {
        "bench": "varlen_gpu_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode, "device": device(), "versions": versions(), "varlen_api": vars(varlen.KernelApi.of(varlen_attn)),
        "model": "Qwen2.5-0.5B architecture, random init, bf16" if cuda else "2-layer Qwen2 (smoke), fp32",
        "batch": {"rows": rows, "width": width, "documents": docs}, "checks": checks,
        "ms_per_fwd_bwd": {"sdpa": ms_sdpa, "varlen": ms_v, "speedup": round(ms_sdpa / ms_v, 3)},
        "ms_per_decoder_fwd_bwd": {"sdpa": ms_dec_sdpa, "varlen": ms_dec_v,
                                   "speedup": round(ms_dec_sdpa / ms_dec_v, 3)},
        "timing_note": "ms_per_fwd_bwd: the whole model, every weight trained, full [tokens x vocab] fp32 "
                       "logits and cross-entropy (attention is a small share); ms_per_decoder_fwd_bwd: the "
                       "decoder only, as a LoRA step runs it (activation gradients, no logits)",
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    shown = ("checks", "ms_per_fwd_bwd", "ms_per_decoder_fwd_bwd", "batch")
    print(json.dumps({k: results[k] for k in shown}))
    return 0 if checks["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
