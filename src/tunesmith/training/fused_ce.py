"""Causal-LM loss without the [tokens x vocab] logits: the LM head and cross-entropy fused, chunk by chunk.

Only positions whose next-token label is not -100 reach the head. Their hidden states go through the head
``chunk_rows`` rows at a time: each chunk's logits are upcast to fp32, the token losses summed, and the
gradients for the hidden states, the head weight and bias computed right there in the forward (the
Liger / cut-cross-entropy approach), so the extra memory is ``chunk_rows x vocab``, never ``N x vocab``.
Backward only scales the stored gradients by the incoming one.

``linear_token_logps`` gives the per-row log-probs instead of their sum (DPO/KTO's sequence log-probs):
its backward weights each row by its own incoming gradient, so it recomputes the chunks there when the
head needs a gradient; when only the hidden states do (LoRA), their per-row gradients are taken in the
forward and scaled row by row.

The chunk math itself (losses and the logits' gradient) is `fused_ce_chunk` (eager, compiled) and, by default
on a GPU, `fused_ce_triton`'s kernel; applying the fused loss to an HF model's own head is `fused_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.torch_version import TorchVersion

from tunesmith.training.fused_ce_chunk import (
    LogitTransform,
    Result,
    SoftmaxGrad,
    compiled_softmax_grad,
    softmax_grad,
)
from tunesmith.training.fused_ce_triton import triton_ready, triton_softmax_grad

# cuBLAS's addmm into an fp32 `self` from bf16/fp16 factors (`out_dtype`, CUDA only): added in torch 2.8, an fp32
# `self` and `out=` handled correctly from 2.10 (pytorch/pytorch#167931).
ADDMM_FP32_OUT = TorchVersion(torch.__version__) >= (2, 10)


NO_TRANSFORM = LogitTransform()  # the head's output is the logits
CHUNK_LOGITS = 2**25  # a chunk holds its logits in bf16 and fp32, then the bf16 gradient: 6 B each, 192 MiB
CHUNK_LOGITS_TRAINED = 2**28  # a trained head's chunk: 1.5 GiB, beside its [V x H] fp32 weight gradient


def default_chunk_rows(vocab_size: int, trained: bool = False) -> int:
    """Rows per chunk: about ``CHUNK_LOGITS`` logits a chunk (8x that for a trained head), 256 to 4096 rows.

    The chunk is the loss's whole transient memory, so it decides QLoRA's peak at short contexts: on
    Llama-3.1-8B at 2048 tokens, 2**27 logits a chunk (1046 rows, 768 MiB) put the peak at 7.57 GiB
    (bench/qlora_memory.py, H200). A chunk of 2**25 still runs a [rows x hidden] x [hidden x vocab]
    matmul of tens of GFLOP, so the GPU stays busy: a frozen head's forward and backward over 12,000 rows
    take 45 ms at 261 rows a chunk against 41 ms at 1,044 (Llama-3.2-1B's head, H200).
    A trained head also adds each chunk's product into its fp32 [V x H] weight gradient, a full read and
    write of it per chunk, so small chunks cost more there: 83 ms at 261 rows, 54 ms at 1,044, 50 ms at
    2,088 (Qwen2.5-0.5B's: 68, 46, 43 ms at 220, 880, 1,760 rows; the plain full-logits path 45 and 37 ms;
    bench/results/fused_ce_gpu_check-2026-11-28T1057Z-*-h200.json). Full fine-tuning holds that gradient
    (1 GiB for Llama-3.2-1B) and the model's fp32 weights and optimizer states anyway, so its chunk is 2**28
    logits (2,092 rows, 1.5 GiB for Llama-3.2-1B's head): the 4 ms it saves there is about 2% of a full step.
    """
    budget = CHUNK_LOGITS_TRAINED if trained else CHUNK_LOGITS
    return max(256, min(4096, budget // max(vocab_size, 1)))


def kernel_or_eager_softmax_grad(logits: torch.Tensor, *rest: Any) -> Result:
    """The chunk math without torch.compile: the Triton kernel where it runs (`fused_ce_triton`: a CUDA
    chunk, triton installed), else eager `softmax_grad`. Decided per chunk, from its logits' device."""
    return (triton_softmax_grad if triton_ready(logits) else softmax_grad)(logits, *rest)


@dataclass(frozen=True)
class ChunkPlan:
    """How one call runs: rows per chunk, the matmul dtype, and the chunk math: compiled with torch.compile
    when ``backend`` is set, else `kernel_or_eager_softmax_grad` (``kernel=False``: always eager
    `softmax_grad`, which the benchmark times against the kernel)."""

    rows: int
    compute: torch.dtype
    backend: str | None = None
    kernel: bool = True

    def math(self) -> SoftmaxGrad:
        if self.backend is not None:
            return compiled_softmax_grad(self.backend)
        return kernel_or_eager_softmax_grad if self.kernel else softmax_grad


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None,
    transform: LogitTransform,
    plan: ChunkPlan,
    want: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Sum of (weighted) token losses, the unweighted loss of each row [N] and, where ``want`` says so,
    gradients for hidden, weight, bias. The matmuls run in ``plan.compute`` (`compute_dtype`)."""
    want_h, want_w, want_b = want
    compute, math = plan.compute, plan.math()
    w_c = weight.to(compute)  # one cast a call (a no-op unless fp32 weights train under autocast)
    b_c = bias.to(compute) if bias is not None else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_h else None
    # Accumulated in place with addmm (cuBLAS sums each chunk in fp32): no second [V, H] buffer.
    grad_w = torch.zeros_like(weight) if want_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
    for start in range(0, hidden.shape[0], plan.rows):
        end = min(start + plan.rows, hidden.shape[0])
        h = hidden[start:end].to(compute)
        w = token_weights[start:end].float() if token_weights is not None else None
        row_loss, g, g_sum = math(
            F.linear(h, w_c, b_c), targets[start:end], w, transform, any(want), want_b, compute
        )
        rows[start:end] = row_loss
        total += (row_loss * w).sum() if w is not None else row_loss.sum()
        if g is None:
            continue
        if grad_b is not None:
            grad_b += g_sum
        if grad_h is not None:
            grad_h[start:end] = g @ w_c
        if grad_w is not None:
            _accumulate_product_(grad_w, g.t(), h)
    return total, rows, grad_h, grad_w, grad_b


def compute_dtype(weight: torch.Tensor, mixed: torch.dtype | None = None) -> torch.dtype:
    """The dtype the head's matmuls run in. An fp32 weight (full fine-tuning keeps fp32 weights) of a bf16
    run (``mixed``, or bf16 autocast on) runs them in bf16, as the model's own linear layers do under
    autocast; any other weight, and every fp16 run, in the weight's own dtype. fp16 is left out on purpose:
    the head's gradient is taken in the forward, before the loss scale exists, and fp16's range would round
    the small softmax gradients of rare tokens to zero.

    ``mixed`` is needed because the trainer computes the loss after the model's forward, outside the autocast
    that accelerate wraps around that forward. Without it an fp32 head ran all its matmuls in fp32: on an
    H200, 0.45 s of a 0.9 s Llama-3.2-1B full-SFT step (bench/profile_step_gpu.py), and 2.8x slower than
    bf16 at that head's shape (bench/fused_ce_gpu_check.py).
    """
    if weight.dtype != torch.float32:
        return weight.dtype
    kind = weight.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return torch.bfloat16 if torch.bfloat16 in (mixed, autocast) else weight.dtype


def _plan(
    weight: torch.Tensor, chunk_rows: int | None, mixed: torch.dtype | None, backend: str | None, kernel: bool
) -> ChunkPlan:
    """One call's plan: a trained head's larger chunks only when gradients flow."""
    trained = weight.requires_grad and torch.is_grad_enabled()
    rows = chunk_rows or default_chunk_rows(weight.shape[0], trained)
    return ChunkPlan(rows, compute_dtype(weight, mixed), backend, kernel)


def _accumulate_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place.

    Same dtypes: one addmm. An fp32 ``acc`` of half-precision factors: on CUDA (`ADDMM_FP32_OUT`), cuBLAS
    writes the fp32 sum straight into ``acc``; otherwise the product is rounded to the factors' dtype once per
    chunk and added in fp32, as a plain autocast linear's weight gradient is.
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and ADDMM_FP32_OUT:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def _scale_(grad: torch.Tensor, by: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``grad *= by`` in place (the buffer belongs to one autograd node), the product taken in fp32.

    A bf16 tensor times a 0-dim fp32 tensor may round the factor to bf16 first (on CUDA), which would
    scale the whole gradient by up to 0.4% off; blocks of ``rows`` keep the fp32 copy small.
    """
    if grad.dtype == torch.float32:
        return grad.mul_(by)
    for block in grad.split(rows):
        block.copy_(block.float().mul_(by))
    return grad


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and every gradient; backward scales them by the incoming gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        token_weights: torch.Tensor | None,
        transform: LogitTransform,
        plan: ChunkPlan,
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad
        want = (needs[0], needs[1], bias is not None and needs[2])
        total, _, grad_h, grad_w, grad_b = _chunked(
            hidden, weight, bias, targets, token_weights, transform, plan, want
        )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_h = _scale_(grad_h, grad_out) if grad_h is not None else None
        grad_w = _scale_(grad_w, grad_out) if grad_w is not None else None
        grad_b = (grad_b * grad_out).to(ctx.bias_dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    transform: LogitTransform = NO_TRANSFORM,
    chunk_rows: int | None = None,
    mixed: torch.dtype | None = None,
    compile_backend: str | None = None,
    kernel: bool = True,
) -> torch.Tensor:
    """Sum over rows of ``token_weight * cross_entropy(transform(hidden @ weight.T + bias), target)``.

    hidden [N, H] (supervised positions only: no -100 targets), weight [V, H], targets [N], token_weights
    [N]. Returns a 0-dim fp32 tensor; never allocates more than ``chunk_rows x V`` logits.
    Example: ``linear_cross_entropy(h, model.lm_head.weight, t) / t.numel()`` is the mean token loss.
    ``mixed``: the run's mixed-precision dtype, for an fp32 weight (`compute_dtype`). ``compile_backend``:
    each chunk's softmax and gradient through torch.compile with that backend (`fused_ce_chunk`); else
    ``kernel``: the Triton kernel where it runs (`fused_ce_triton`), False: the eager math.
    """
    plan = _plan(weight, chunk_rows, mixed, compile_backend, kernel)
    if not torch.is_grad_enabled():  # a Function would still compute gradients (needs_input_grad ignores it)
        return _chunked(hidden, weight, bias, targets, token_weights, transform, plan, (False,) * 3)[0]
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, token_weights, transform, plan)


def _scale_rows(grad: torch.Tensor, by: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``grad * by[:, None]`` (a new tensor of grad's dtype), the product taken in fp32 a block at a time."""
    out = torch.empty_like(grad)
    for start in range(0, grad.shape[0], rows):
        end = min(start + rows, grad.shape[0])
        out[start:end] = grad[start:end].float() * by[start:end, None].float()
    return out


class _LinearTokenLogps(torch.autograd.Function):
    """Per-row log-probs of the targets; backward is the weighted cross-entropy's with weights -grad_out."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        transform: LogitTransform,
        plan: ChunkPlan,
    ) -> torch.Tensor:
        needs = ctx.needs_input_grad
        ctx.want = (needs[0], needs[1], bias is not None and needs[2])
        ctx.recompute = ctx.want[1] or ctx.want[2]
        ctx.transform, ctx.plan = transform, plan
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if ctx.recompute:  # the head's gradient mixes rows by weights only backward knows: redo the chunks
            _, rows, _, _, _ = _chunked(hidden, weight, bias, targets, None, transform, plan, (False,) * 3)
            ctx.save_for_backward(hidden, weight, bias, targets)
        else:  # each row of grad_h depends on its own row's loss only: take them now, scale them later
            _, rows, grad_h, _, _ = _chunked(
                hidden,
                weight,
                bias,
                targets,
                None,
                transform,
                plan,
                (needs[0], False, False),
            )
            ctx.save_for_backward(grad_h)
        return rows.neg_()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.recompute:
            (grad_h,) = ctx.saved_tensors
            return _scale_rows(grad_h, grad_out.neg()), None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        _, _, grad_h, grad_w, grad_b = _chunked(
            hidden,
            weight,
            bias,
            targets,
            grad_out.neg(),
            ctx.transform,
            ctx.plan,
            ctx.want,
        )
        grad_b = grad_b.to(ctx.bias_dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = NO_TRANSFORM,
    chunk_rows: int | None = None,
    mixed: torch.dtype | None = None,
    compile_backend: str | None = None,
    kernel: bool = True,
) -> torch.Tensor:
    """Per row, ``log_softmax(transform(hidden @ weight.T + bias))[target]``: [N] fp32, exact gradients.

    Same inputs as `linear_cross_entropy` (equal to ``-linear_token_logps(...).sum()``); never allocates
    more than ``chunk_rows x V`` logits, forward or backward.
    """
    plan = _plan(weight, chunk_rows, mixed, compile_backend, kernel)
    if not torch.is_grad_enabled():
        return _chunked(hidden, weight, bias, targets, None, transform, plan, (False,) * 3)[1].neg_()
    return _LinearTokenLogps.apply(hidden, weight, bias, targets, transform, plan)


__all__ = [
    "ChunkPlan",
    "LogitTransform",
    "compute_dtype",
    "default_chunk_rows",
    "linear_cross_entropy",
    "linear_token_logps",
]
