"""One chunk of the fused LM head's loss: token losses and the logits' gradient from the chunk's logits.

`softmax_grad` is the eager form: in place on the chunk's fp32 logits, then cast to the matmul dtype. It
makes several full passes over the ``[rows x vocab]`` chunk (upcast, logsumexp, subtract and exp, scatter,
downcast): on a full-SFT Llama-3.2-1B step (H200) these elementwise kernels took about 30 of its 270 ms
(bench/results/profile_step_gpu-2026-11-28T1352Z-full-llama-compile-h200-by_cuda.txt).

`compiled_softmax_grad(backend)` is the same math written without in-place ops or a scatter (the target's
-1 is a comparison with the column index), compiled once per process and backend. Inductor fuses it into
one reduction over the bf16 logits (the log-sum-exp and the target's logit) and one pointwise kernel that
writes the bf16 gradient: two reads and one write of the chunk. The trainer uses it when the run sets
`torch_compile: true` (with that key's backend).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to the head's output: ``z = x * scale``, then ``z = softcap * tanh(z / softcap)``."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config: Any) -> LogitTransform:
        """Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``."""
        text = config.get_text_config()
        scale = float(getattr(text, "logit_scale", None) or 1.0)
        scale /= float(getattr(text, "logits_scaling", None) or 1.0)
        softcap = getattr(text, "final_logit_softcapping", None)
        return cls(scale=scale, softcap=float(softcap) if softcap else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transformed logits (for the probe and tests)."""
        z = logits * self.scale if self.scale != 1.0 else logits
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z


Result = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
SoftmaxGrad = Callable[..., Result]


def _row_losses(
    logits: torch.Tensor, targets: torch.Tensor, transform: LogitTransform
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both forms' start: the transformed fp32 logits z [C, V] (like the plain path), their log-sum-exp [C]
    and the row losses [C]."""
    z = transform.apply(logits.float())
    lse = torch.logsumexp(z, dim=-1)
    return z, lse, lse - z.gather(1, targets[:, None]).squeeze(1)


def softmax_grad(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, transform: LogitTransform,
    want_grad: bool, want_bias: bool, compute: torch.dtype,
) -> Result:  # fmt: skip
    """(row losses [C] fp32, d(sum of weighted losses)/d(logits) [C, V] in ``compute`` or None, its column
    sums [V] fp32 for a bias or None). ``logits`` [C, V] are the head's output before the transform;
    ``weights`` [C] fp32 or None (all 1)."""
    z, lse, row_loss = _row_losses(logits, targets, transform)
    if not want_grad:
        return row_loss, None, None
    # softmax; in z's own buffer unless the soft-cap derivative still needs z
    g = (z - lse[:, None]).exp_() if transform.softcap else z.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))  # minus the one-hot target
    if weights is not None:
        g.mul_(weights[:, None])
    if transform.softcap:
        g.mul_(z.div_(transform.softcap).square_().neg_().add_(1.0))  # d(c*tanh(x/c))/dx = 1 - tanh^2
    if transform.scale != 1.0:
        g.mul_(transform.scale)
    return row_loss, g.to(compute), g.sum(0) if want_bias else None


def fusable_softmax_grad(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, transform: LogitTransform,
    want_grad: bool, want_bias: bool, compute: torch.dtype,
) -> Result:  # fmt: skip
    """`softmax_grad`'s numbers, written for a compiler: no in-place update, no scatter."""
    z, lse, row_loss = _row_losses(logits, targets, transform)
    if not want_grad:
        return row_loss, None, None
    hot = torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None]
    g = torch.exp(z - lse[:, None]) - hot.to(z.dtype)
    if weights is not None:
        g = g * weights[:, None]
    if transform.softcap:
        g = g * (1.0 - (z / transform.softcap) ** 2)
    if transform.scale != 1.0:
        g = g * transform.scale
    return row_loss, g.to(compute), g.sum(0) if want_bias else None


MIN_COMPILED_ROWS = 2  # dynamo specialises a dimension of size 0 or 1: such a chunk runs eagerly instead


@functools.cache
def _compiled(backend: str) -> SoftmaxGrad:
    compiled: Any = torch.compile(fusable_softmax_grad, backend=backend)
    return compiled


def compiled_softmax_grad(backend: str) -> SoftmaxGrad:
    """`fusable_softmax_grad` under torch.compile with ``backend`` (compiled once per process and backend).

    The chunk's row count is dynamic from the first call (`maybe_mark_dynamic` on dimension 0: a hint, so a
    backend that must specialise it recompiles instead of failing the run; the vocabulary stays static, so
    the reduction is compiled for its size): the last chunk of every batch has its own count, and one graph
    serves them all instead of a recompile in the middle of a run. A chunk of one row,
    which dynamo would specialise, runs eagerly. Each kind of call (with or without gradient, weights, bias
    sums; each logit transform and dtype) is a graph of its own, about four in a run; past dynamo's
    recompile limit a new kind runs eagerly rather than failing. `torch_compile_mode` applies to the decoder
    layers only: CUDA graphs of this function would be recorded per chunk size.
    """
    compiled = _compiled(backend)

    def run(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, *rest: Any) -> Result:
        if logits.shape[0] < MIN_COMPILED_ROWS:
            return fusable_softmax_grad(logits, targets, weights, *rest)
        for t in (logits, targets, weights):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(logits, targets, weights, *rest)

    return run


__all__ = ["LogitTransform", "compiled_softmax_grad", "fusable_softmax_grad", "softmax_grad"]
