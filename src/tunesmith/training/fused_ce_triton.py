"""One chunk of the fused LM head's loss as a Triton kernel: two passes over the chunk instead of about eight.

Eager `fused_ce_chunk.softmax_grad` walks the fp32 ``[rows x vocab]`` chunk some eight times (upcast,
log-sum-exp, subtract, exp, scatter, weight, downcast): on an H200 with Qwen2.5's 152k vocabulary that was
about 15% of a whole LoRA training step. `triton_softmax_grad` does the same math with one program per row:
pass 1 reads the matmul-dtype logits once (an online max and sum of exponentials in fp32, and the target's
logit), pass 2 reads them again and writes the gradient in the matmul dtype, into the logits' own buffer
when the dtypes match. Everything between is fp32 in registers. On an H200 (bf16, 151,936 columns) a chunk
of 883 rows took 0.28 ms against eager's 2.5 ms (2.9 TB/s moved; 0.41 against 4.7 ms with a soft-cap), and
Qwen2.5-0.5B's head, forward and backward over 12,000 rows, 16 ms against 42 ms frozen (LoRA) and 21 ms
against 46 ms trained, where inductor's compiled form took 22 ms (bench/fused_ce_gpu_check.py --shape qwen,
2026-11-28).

`fused_ce.ChunkPlan` uses it by default where `triton_ready` says it can run (a CUDA tensor, triton
installed) and the run does not compile the chunk math with torch.compile; eager `softmax_grad` stays the
path on the CPU and without triton. Importing this module never imports triton: `_kernel` does, on first
use. The launch is capturable in a CUDA graph (no host sync, no allocation but the outputs, no autotuning;
the row count is the grid only, so every chunk size shares one compiled kernel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.training.fused_ce_chunk import LogitTransform, Result, softmax_grad
from tunesmith.triton_build import build

# Columns a program holds at once (16 fp32 values a thread) and its warps. Of five shapes timed on an H200 at
# 151,936 columns, 4096 x 8 was the fastest at 883 rows (a trained head's chunk), 6% behind 2048 x 4 at 4096
# rows and 0.03 ms behind 8192 x 8 at 220; one shape for every chunk keeps one compiled kernel.
MAX_BLOCK = 4096
NUM_WARPS = 8

tl: Any = None  # triton.language, bound by `triton_build.build` (the kernel's source resolves `tl` here)


def _softmax_grad_rows(
    logits_ptr, logits_stride, targets_ptr, weights_ptr, loss_ptr, grad_ptr, grad_stride, scale, softcap,
    N_COLS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, SCALED: tl.constexpr, SOFTCAPPED: tl.constexpr,
    WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: its loss ``lse(z) - z[target]``; with WANT_GRAD, ``(softmax(z) - onehot) * w * dz/dx``.

    ``z = softcap * tanh(x * scale / softcap)``; tanh is ``2 * sigmoid(2t) - 1``, as triton's interpreter
    has no libdevice (within 3e-7 of torch.tanh, so within ``3e-7 * softcap`` on a logit). The vocabulary
    N_COLS is a constant: one compile per vocabulary (a run has one), and triton 3.5's interpreter fails on a
    runtime loop bound under numpy 2.4 (triton-lang/triton#9171).
    """
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows x stride passes 2**31 in a large chunk
    logits_ptr += row * logits_stride
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")  # running max
    d = 0.0  # running sum of exp(z - m)
    hit = tl.zeros([BLOCK], dtype=tl.float32)  # z[target], where its column passes
    for start in range(0, N_COLS, BLOCK):
        idx = start + cols
        inside = idx < N_COLS
        z = tl.load(logits_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        if SCALED:
            z = z * scale
        if SOFTCAPPED:
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
        z = tl.where(inside, z, float("-inf"))  # after the transform: softcap(-inf) is -softcap
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        hit += tl.where(idx == target, z, 0.0)
    lse = m + tl.log(d)
    tl.store(loss_ptr + row, lse - tl.sum(hit, 0))
    if WANT_GRAD:
        grad_ptr += row * grad_stride
        weight = 1.0
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + row).to(tl.float32)
        for start in range(0, N_COLS, BLOCK):
            idx = start + cols
            inside = idx < N_COLS
            z = tl.load(logits_ptr + idx, mask=inside, other=0.0).to(tl.float32)
            if SCALED:
                z = z * scale
            if SOFTCAPPED:
                tanh = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
                z = softcap * tanh
            g = (tl.exp(z - lse) - tl.where(idx == target, 1.0, 0.0)) * weight
            if SOFTCAPPED:
                g = g * (1.0 - tanh * tanh)  # d(c * tanh(x / c))/dx
            if SCALED:
                g = g * scale
            tl.store(grad_ptr + idx, g.to(grad_ptr.dtype.element_ty), mask=inside)


@dataclass(frozen=True)
class _Kernel:
    fn: Any  # the jit function
    interpreted: bool  # TRITON_INTERPRET was on when it was built: it runs on CPU tensors too


@functools.cache
def _kernel() -> _Kernel | None:
    """The jit kernel, built once a process (`triton_build.build`); None without triton.

    ``do_not_specialize`` on the targets and weights: they are slices of the batch's at each chunk's start,
    whose 16-byte alignment varies; specialised, a new alignment would compile a variant, perhaps in the
    middle of a CUDA graph capture.
    """
    options = {"do_not_specialize": ["targets_ptr", "weights_ptr"]}
    built = build(globals(), [(_softmax_grad_rows, options)], "fused loss")
    return None if built is None else _Kernel(built.fns[0], built.interpreted)


def triton_ready(t: torch.Tensor) -> bool:
    """Whether `triton_softmax_grad` runs on ``t``'s device: triton is installed and ``t`` is on a GPU, or
    triton's interpreter (TRITON_INTERPRET=1 when the kernel was first built: tests) runs it on the CPU."""
    kernel = _kernel()
    return kernel is not None and (t.is_cuda or kernel.interpreted)


def block_columns(vocab: int) -> int:
    """Columns a program loads at once: the vocabulary's next power of two, at most `MAX_BLOCK`."""
    return min(MAX_BLOCK, 1 << max(vocab - 1, 1).bit_length())


def triton_softmax_grad(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, transform: LogitTransform,
    want_grad: bool, want_bias: bool, compute: torch.dtype, block: int | None = None,
) -> Result:  # fmt: skip
    """`fused_ce_chunk.softmax_grad`'s contract and numbers, in one Triton kernel (two reads of the chunk).

    ``logits`` [C, V] (bf16, fp16 or fp32) are the head's output before ``transform``; ``targets`` [C] valid
    class ids (the fused head only sends labelled rows); ``weights`` [C] or None. The gradient is written
    into ``logits`` when it is contiguous and of dtype ``compute`` (the chunk's fresh matmul output: no
    second ``[C, V]`` buffer), else into a new tensor. The bias sums (``want_bias``, heads with a bias only)
    are a torch reduction of that gradient, accumulated in fp32 but over its ``compute``-dtype values, not
    the fp32 ones eager sums: a bias is rare and the rounded gradient is also what the matmuls use.
    ``block``: columns a program loads at once (tests force a small one), else `block_columns`.
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("triton_softmax_grad needs triton; pip install triton, or use softmax_grad")
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    targets, weights = targets.contiguous(), weights.contiguous() if weights is not None else None
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = None
    if want_grad:
        in_place = logits.dtype == compute and logits.is_contiguous()
        grad = logits if in_place else torch.empty(rows, vocab, dtype=compute, device=logits.device)
    if rows:  # one program per row; the row count is the grid only, never a specialisation
        out = grad if grad is not None else logits  # not written without WANT_GRAD
        kernel.fn[(rows,)](
            logits, logits.stride(0), targets, weights if weights is not None else loss, loss,
            out, out.stride(0), float(transform.scale), float(transform.softcap or 1.0),
            N_COLS=vocab, HAS_WEIGHTS=weights is not None, SCALED=transform.scale != 1.0,
            SOFTCAPPED=bool(transform.softcap), WANT_GRAD=want_grad,
            BLOCK=block or block_columns(vocab), num_warps=NUM_WARPS,
        )  # fmt: skip
    bias = grad.sum(0, dtype=torch.float32) if want_bias and grad is not None else None
    return loss, grad, bias


CHECK_ROWS = 4


def kernel_fault(weight: torch.Tensor, transform: LogitTransform, compute: torch.dtype) -> str | None:
    """Why the kernel cannot be a run's chunk math on ``weight``'s head, or None when it can (or when it
    would not run there anyway: no GPU or no triton, where the eager math runs).

    Compiles the kernel for this vocabulary now, once per run, and checks it against `softmax_grad` on a
    few random rows of ``compute`` logits (drawn on the CPU: the run's CUDA random state is not touched).
    A triton that cannot compile it for this GPU, or gets other numbers, costs the run its speed-up only.
    """
    vocab = weight.shape[0]
    try:
        if not triton_ready(weight):  # the check's logits go to the head's device; nothing made without it
            return None
        logits = torch.randn(CHECK_ROWS, vocab, generator=torch.Generator().manual_seed(0)).mul_(4)
        logits = logits.to(compute).to(weight.device)
        targets = torch.arange(CHECK_ROWS, device=weight.device) * 7919 % vocab
        weights = torch.linspace(0.5, 1.5, CHECK_ROWS, device=weight.device)
        args = (targets, weights, transform, True, False, compute)
        loss, grad, _ = triton_softmax_grad(logits.clone(), *args)
    except Exception as e:  # noqa: BLE001 - any compile or launch failure: the eager math instead
        return f"the kernel failed here ({type(e).__name__}: {str(e)[:200]})"
    ref_loss, ref_grad, _ = softmax_grad(logits.clone(), *args)
    assert grad is not None and ref_grad is not None
    loss_error = float((loss - ref_loss).abs().max() / ref_loss.abs().max().clamp_min(1.0))
    # norm-wise, the targets' columns (about -1 each) apart from the rest: they would hide errors in the many
    # small probabilities
    hot = torch.zeros_like(ref_grad, dtype=torch.bool)
    hot[torch.arange(CHECK_ROWS, device=hot.device), targets] = True
    error, ref = grad.float() - ref_grad.float(), ref_grad.float()
    grad_error = max(float(error[m].norm() / ref[m].norm().clamp_min(1e-30)) for m in (hot, ~hot))
    if loss_error > 1e-4 or grad_error > 1e-2:
        return f"the kernel's numbers differ from the eager math (loss {loss_error:.2g}, gradient {grad_error:.2g})"
    return None


__all__ = ["block_columns", "kernel_fault", "triton_ready", "triton_softmax_grad"]
