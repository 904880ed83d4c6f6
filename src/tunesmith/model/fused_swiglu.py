"""A gated SiLU MLP's ``silu(gate) * up`` as one Triton kernel forward and one backward.

Transformers' dense MLP (Llama, Qwen2/3, Mistral, ...) is ``down(act(gate(x)) * up(x))``. Eagerly that is a
SiLU kernel and a product forward, and three kernels backward (the product's two gradients and SiLU's),
each a pass over ``[tokens x intermediate]`` (4,864 wide in Qwen2.5-0.5B, 8,192 in Llama-3.2-1B), and
autograd keeps ``silu(gate)`` for backward besides ``gate`` and ``up``. `swiglu` reads ``gate`` and ``up``
once forward and writes the product; backward reads the incoming gradient, ``gate`` and ``up`` once and
writes both gradients, recomputing the SiLU in registers. The numbers are eager's: SiLU rounded to the
compute dtype before the product, the product's gradient rounded before SiLU's backward, fp32 inside. On an
H200 (bench/cuda_graph_step.py --mixed, Qwen2.5-0.5B LoRA, 8 rows, replayed, RMSNorm fused): 31.1 -> 30.0 ms
a step; a first version that left the element count unspecialised lost its vectorised loads and was slower
than eager (32.4 ms), hence the row width as a constant.

`FusedSwiGLUMLP` wraps a decoder layer's MLP (its submodules stay registered under their own names, so
parameter names, adapters and saved models do not change) and computes ``down(swiglu(gate(x), up(x)))``.
Only the MLP classes of `SWIGLU_MLP` are wrapped (Llama, Mistral, Qwen2, Qwen3), and only after a probe shows
the wrapper gives the class's own output (a GELU activation fails and keeps its code). The kernel runs on CUDA tensors with triton installed,
outside torch.compile (inductor fuses the eager math itself); elsewhere `swiglu` is the eager math.
Importing this module never imports triton: `_kernels` does, on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.model.layer_probe import compute_dtype, evaluating, mismatch, swap_layers, unmaterialised
from tunesmith.model.tiled_mlp import tileable
from tunesmith.triton_build import build

BLOCK = 1024  # columns a program handles (4 warps, 8 a thread)
tl: Any = None  # triton.language, bound by `triton_build.build` (the kernels' source resolves `tl` here)


# One program per (row, block of BLOCK columns); the row width COLS is a constant (the MLP's intermediate size:
# one compile per model), so the column mask's divisibility is known and loads stay vectorised whatever the
# row count, which is the grid only (a batch of another size never compiles a variant, perhaps inside a CUDA
# graph capture).
def _swiglu_forward(gate_ptr, up_ptr, out_ptr, COLS: tl.constexpr, BLOCK: tl.constexpr):  # noqa: N803
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < COLS
    offsets = tl.program_id(0).to(tl.int64) * COLS + cols
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded, as eager's SiLU
    tl.store(out_ptr + offsets, (act * up).to(out_ptr.dtype.element_ty), mask=inside)


def _swiglu_backward(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, COLS: tl.constexpr, BLOCK: tl.constexpr):  # noqa: N803
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < COLS
    offsets = tl.program_id(0).to(tl.int64) * COLS + cols
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    act = (gate * sig).to(dup_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dup_ptr + offsets, (grad * act).to(dup_ptr.dtype.element_ty), mask=inside)
    dact = (grad * up).to(dgate_ptr.dtype.element_ty).to(tl.float32)  # rounded, as eager's product backward
    dgate = dact * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=inside)


@dataclass(frozen=True)
class _Kernels:
    forward: Any
    backward: Any
    interpreted: bool  # TRITON_INTERPRET was on when they were built: they run on CPU tensors too


@functools.cache
def _kernels() -> _Kernels | None:
    """The jit kernels, built once a process (`triton_build.build`); None without triton."""
    built = build(globals(), [(_swiglu_forward, {}), (_swiglu_backward, {})], "fused swiglu")
    return None if built is None else _Kernels(*built.fns, built.interpreted)


def kernel_ready(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `swiglu` runs the kernel on these operands: same shape and floating dtype, on a GPU (or in
    triton's interpreter, for tests), not while torch.compile traces."""
    if torch.compiler.is_compiling() or gate.shape != up.shape or gate.dtype != up.dtype:
        return False
    if not gate.is_floating_point() or gate.device != up.device:
        return False
    kernels = _kernels()
    return kernels is not None and (gate.is_cuda or kernels.interpreted)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        _launch(_kernels().forward, gate, up, out)  # type: ignore[union-attr]
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad = grad.to(gate.dtype).contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        _launch(_kernels().backward, grad, gate, up, dgate, dup)  # type: ignore[union-attr]
        return dgate, dup


def _launch(kernel: Any, *tensors: torch.Tensor) -> None:
    cols = tensors[0].shape[-1]
    rows = tensors[0].numel() // max(cols, 1)
    if rows and cols:
        kernel[(rows, -(-cols // BLOCK))](*tensors, COLS=cols, BLOCK=BLOCK, num_warps=4)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: the Triton kernels where `kernel_ready`, else the eager math."""
    if kernel_ready(gate, up):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class FusedSwiGLUMLP(nn.Module):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))`` over a dense gated MLP's own submodules."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.replaces = type(mlp).__name__
        for name, child in mlp.named_children():  # the same names: parameter names do not change
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"


@torch.no_grad()
def probe(mlp: nn.Module) -> str | None:
    """None when `FusedSwiGLUMLP` gives ``mlp``'s own output on random rows (in its dtype and device, through
    the kernel where it would run); else why not."""
    if not tileable(mlp):  # the same shape tiled_mlp_tokens wraps
        return "not a dense gated MLP (gate_proj, up_proj, down_proj, no weights of its own)"
    reason = unmaterialised(mlp)
    if reason is not None:
        return reason
    weight = next(mlp.parameters())
    try:
        with evaluating(mlp):
            hidden = mlp.gate_proj.in_features
            x = torch.randn(8, hidden, generator=torch.Generator().manual_seed(0))
            x = x.to(weight.device, compute_dtype(mlp))
            want = type(mlp).forward(mlp, x)
            got = FusedSwiGLUMLP(mlp)(x)
    except Exception as e:  # noqa: BLE001 - an MLP that cannot be probed keeps its own code
        return f"probe failed: {type(e).__name__}: {str(e)[:200]}"
    return mismatch(want, got, 8, "down(silu(gate) * up)")  # a rounding or two, through down


# MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` and nothing else (read in
# transformers 5.17 and 5.24); the probe checks the activation is SiLU. An allow-list, not the probe alone:
# a probe in eval mode on a few rows cannot see a dropout or a clamp that only training or large values reach.
SWIGLU_MLP = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _not_wrappable(mlp: nn.Module) -> str | None:
    cls = type(mlp)
    if cls.__name__ not in SWIGLU_MLP or not cls.__module__.startswith("transformers.models."):
        return "not an MLP class whose forward the fused one reproduces"
    return None


def fuse_swiglu_mlps(layers: list[nn.Module]) -> tuple[int, dict[str, str]]:
    """Wrap the ``mlp`` of each decoder layer whose class passes `probe`; returns (wrapped, {class kept: why}).
    MLPs already wrapped (tiled_mlp_tokens' TiledMLP) are left as they are."""
    return swap_layers(layers, "mlp", FusedSwiGLUMLP, probe, _not_wrappable)
