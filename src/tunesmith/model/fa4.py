"""FlashAttention-4's kernels for `flash_attn: varlen` on Hopper and Blackwell GPUs (`varlen_kernel`).

PyTorch's own varlen kernel is FlashAttention-2. On an H200 it ran the causal attention of the bench's packed
Llama-3.2-1B steps (32 query / 8 KV heads of 64, documents of 478 tokens on average) at 144 TFLOP/s forward
and 211 backward: 41 ms of a full-SFT step of about 0.26 s (bench/results/attention_kernels-2026-11-29T0429Z-*).
FlashAttention-4 (package flash-attn-4, `pip install 'tunesmith[fa4]'`) has kernels written for SM90 and
SM100 in NVIDIA's CuTe DSL, compiled just in time on first use (about 30 s at a run's start there). On the
same steps it ran at 226 TFLOP/s forward and 362 backward, 25 ms a step, with the same outputs and gradients
up to bf16 rounding; the full-SFT step went from 56,419 to 59,428 trained tokens/s in one call
(bench/results/attention_kernels-2026-11-29T0445Z-*, train_throughput-2026-11-29T0445Z-*).

They are called through two custom ops (forward, backward), so a decoder layer compiled by `torch_compile`
keeps one graph: the ops are opaque to inductor, as PyTorch's own varlen op is. The package's entry points
used here (`_flash_attn_fwd`, `_flash_attn_bwd` of `flash_attn.cute.interface`) are the ones PyTorch's own
FA4 registration calls; their first return values are read by position, as their later returns changed
between releases.
"""

import functools
import importlib
import importlib.util
import logging
from typing import Any

import torch

from tunesmith.errors import TunesmithError

MODULE = "flash_attn.cute.interface"
INSTALL = "pip install 'tunesmith[fa4]'"
logger = logging.getLogger(__name__)


def unusable() -> str | None:
    """Why FA4's kernels cannot run here, or None when they can: the package, and a CUDA GPU of compute
    capability 9.x (Hopper) or 10.x (Blackwell)."""
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # a flash_attn without the cute subpackage (FlashAttention-2)
        found = False
    if not found:
        return f"the flash-attn-4 package is not installed ({INSTALL})"
    if not torch.cuda.is_available():
        return "there is no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return f"this GPU has compute capability {major}.{minor}; FA4 has kernels for 9.x and 10.x"
    return None


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("flash-attn-4")
    except PackageNotFoundError:
        return "unknown version"


@functools.cache
def _interface() -> Any:  # looked up once: every attention call of a step goes through it
    return importlib.import_module(MODULE)


def _window(left: int) -> dict[str, Any]:
    """FA4's window arguments: none for plain causal (left < 0), else `left` keys back and none ahead."""
    return {} if left < 0 else {"window_size_left": left, "window_size_right": 0}


@torch.library.custom_op("tunesmith::fa4_varlen_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float, left: int
) -> tuple[torch.Tensor, torch.Tensor]:
    res = _interface()._flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
        softmax_scale=scale, causal=True, return_lse=True, **_window(left),
    )  # fmt: skip
    return res[0], res[1]


@_fwd.register_fake
def _fwd_fake(q, k, v, cu, max_len, scale, left):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("tunesmith::fa4_varlen_bwd", mutates_args=())
def _bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float, left: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    res = _interface()._flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=scale, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
        max_seqlen_q=max_len, max_seqlen_k=max_len, **_window(left),
    )  # fmt: skip
    return res[0], res[1], res[2]


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu, max_len, scale, left):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu, max_len, scale, left = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu)
    ctx.args = (max_len, scale, left)


def _backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = _bwd(dout.contiguous(), q, k, v, out, lse, cu, *ctx.args)
    return dq, dk, dv, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def fa4_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float,
    window: int | None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of each document: q [T, H, D], k/v [T, Hkv, D] (bf16/fp16, CUDA) -> [T, H, D]."""
    out, _ = _fwd(q, k, v, cu, max_len, scale, window - 1 if window else -1)
    return out


KERNELS = ("auto", "torch", "fa4")


def choose(kernel: str, api: Any, *, cuda: bool, dtype: torch.dtype, head_size: int) -> str:
    """`varlen_kernel` -> the kernel the CUDA path runs: "torch" (PyTorch's flash varlen kernel) or "fa4"
    (FlashAttention-4, `fa4_varlen`). auto: fa4 where it is installed, runs on this GPU and agrees
    with torch's kernel on a small forward + backward, else torch (and the log says why). fa4: the same
    checks, failing with the fix. Without CUDA, where the documents run through SDPA, torch (fa4: error)."""
    if kernel not in KERNELS:
        raise TunesmithError(
            f"varlen_kernel: unknown value {kernel!r}; allowed: {', '.join(KERNELS)}. Fix: use auto"
        )
    if kernel == "torch":
        return "torch"
    reason = unusable() if cuda else "there is no CUDA GPU (on CPU, varlen runs each document through SDPA)"
    if reason is None:
        logger.info(
            "flash_attn: varlen: checking FlashAttention-4's kernels against PyTorch's (they compile first)"
        )
        reason = preflight(api, dtype, head_size)
    if reason is None:
        return "fa4"
    if kernel == "fa4":
        raise TunesmithError(
            f"varlen_kernel: fa4 cannot run: {reason}. Fix: {INSTALL}, or varlen_kernel: torch"
        )
    if cuda:
        logger.info("flash_attn: varlen: varlen_kernel: auto does not use FlashAttention-4: %s", reason)
    return "torch"


def preflight(api: Any, dtype: torch.dtype, head_size: int) -> str | None:
    """FA4's forward + backward of two short documents (4 query heads, 2 KV heads; compiles its kernels)
    against torch's flash kernel: None when they agree within bf16 rounding, else why not."""
    from tunesmith.model.varlen import flash_varlen

    if dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16 or fp16, not {dtype}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((24, 4, head_size), (24, 2, head_size), (24, 2, head_size))
    leaves = [torch.randn(s, device="cuda", dtype=dtype, generator=gen) for s in shapes]
    cu = torch.tensor([0, 10, 24], device="cuda", dtype=torch.int32)
    results = []
    try:
        for fn in (fa4_varlen, lambda *a: flash_varlen(*a, api)):
            q, k, v = (x.detach().clone().requires_grad_() for x in leaves)
            out = fn(q, k, v, cu, 14, head_size**-0.5, None)
            out.float().square().sum().backward()
            results.append([t.detach().float() for t in (out, q.grad, k.grad, v.grad)])
        torch.cuda.synchronize()
    except Exception as e:  # any failure of the package's kernels here means: do not train with them
        return (
            f"its forward + backward failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
    for name, a, b in zip(("output", "dq", "dk", "dv"), *results):
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        if not rel < 2e-2:
            return f"its {name} differs from PyTorch's flash kernel by {rel:.3g} (relative)"
    return None
