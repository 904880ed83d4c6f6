"""LoRA linear layers whose adapter update is fused into the base matmul's output, forward and backward.

PEFT computes a LoRA layer as ``result = base(x) + lora_B(lora_A(x)) * scaling``: besides the three
matmuls, two elementwise passes over the ``[tokens x out_features]`` output in the forward (the scaling
and the sum) and two in the backward (the scaling of the incoming gradient, and the sum of the input's two
gradients, base and adapter, over ``[tokens x in_features]``). With LoRA on every linear layer of a
24-layer model that is some 700 kernels and about 20 GB of memory traffic per step of 3,500 tokens (on an
H200, about a tenth of a replayed default step). Here the adapter's product is added by the matmul itself
(``addmm``: cuBLAS adds it to the base output while it accumulates in fp32) and the scaling rides on A's cast
to the compute dtype (``sA``), so none of those passes remains:

    forward   y  = x W^T (+ bias);   y += (x (sA)^T) B^T
    backward  g  = dy B;  dx = dy W + g (sA);  dA = s g^T x;  dB = dy^T (x (sA)^T)

Only while a CUDA graph is being captured (`training/step_graphs.py`): there the host's cost is paid once
and every replay gains (the default LoRA step of bench/cuda_graph_step.py --mixed, 8 rows, 3,096 tokens,
H200: 40.6 -> 36.9 ms replayed). Run eagerly, each call is launched from Python again, and this layer's
Python backward costs the host more than PEFT's C++ autograd nodes: that step took 157 ms against PEFT's
147 ms. So outside a capture (and under torch.compile, whose inductor fuses PEFT's passes itself) the layer
is PEFT's. The numbers are PEFT's up to rounding: the base output and ``x (sA)^T`` are rounded to the compute
dtype, then the product is added in fp32 and the sum rounded once, where PEFT rounds the product, the
scaled product and the sum; the adapters' gradients leave their matmuls in fp32 without a bf16 rounding. The layer is PEFT's own
`lora.Linear`, registered through LoraConfig's custom-module mapping, so adapters save, load, merge and
unload as PEFT's; anything the fused path does not cover (dropout, DoRA and other variants, several
active adapters, merged or disabled adapters, mixed-adapter batches, a trained base weight, a
fan-in-fan-out layout, inputs in another dtype than the base weight outside autocast) runs PEFT's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

logger = logging.getLogger(__name__)


class _LoraLinear(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` for a frozen ``W``/``b`` and trained ``A``/``B``, in ``x``'s dtype; 2-D
    in and out (a view of its output would forbid a model's in-place op on it, as OLMo's q/k/v clamp).

    The scaling rides on A's cast to the compute dtype (one kernel makes ``s A`` in bf16), and the adapters'
    gradients come out of their matmuls in the adapters' own dtype (`_mm_to`: cuBLAS writes fp32 from bf16
    operands), so a layer launches 5 kernels forward and 6 backward besides autograd's accumulation, where a
    scaling of ``x A^T`` and of ``dy B`` and a cast of each gradient made 6 and 8."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    ) -> torch.Tensor:  # fmt: skip
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            a_s = torch.mul(lora_a, scaling, out=torch.empty_like(lora_a, dtype=dtype))  # s A, cast
            b = lora_b.to(dtype)
            xa = x @ a_s.t()  # s x A^T
            y = torch.nn.functional.linear(x, weight, bias)
            y.addmm_(xa, b.t())
        ctx.save_for_backward(x, weight, a_s, b, xa)
        ctx.scaling = scaling
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, a_s, b, xa = ctx.saved_tensors
        dy = grad.to(x2.dtype)
        g = dy @ b  # dy B
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight).addmm_(g, a_s)  # dy W + s (dy B) A
        da = db = None
        if ctx.needs_input_grad[3]:  # s (dy B)^T x
            da = _mm_to(g.t(), x2, ctx.dtypes[0])
            if ctx.scaling != 1.0:
                da.mul_(ctx.scaling)
        if ctx.needs_input_grad[4]:  # dy^T (s x A^T)
            db = _mm_to(dy.t(), xa, ctx.dtypes[1])
        return dx, None, None, da, db, None


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (CUDA kernels only)


def _mm_to(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``m1 @ m2`` written in ``dtype``: by the matmul itself where torch has it (CUDA, fp32 out of bf16 or
    fp16, accumulated in fp32 as a plain matmul is), else the matmul in the operands' dtype, then cast."""
    if dtype == m1.dtype:
        return m1 @ m2
    if (
        _MM_OUT_DTYPE
        and m1.is_cuda
        and dtype == torch.float32
        and m1.dtype in (torch.bfloat16, torch.float16)
    ):
        return torch.mm(m1, m2, out_dtype=dtype)
    return (m1 @ m2).to(dtype)


class FusedLoraLinear(LoraLinear):
    """PEFT's LoRA linear layer; its forward takes the fused path where it applies (`fused_operands`).

    ``fuse_eagerly`` (False; set per layer): take the fused path outside a capture too, as the bench's eager
    twin of a captured step does, to compare the replay with the same math run eagerly."""

    fuse_eagerly = False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fuse = self.fuse_eagerly or capturing(x)
        operands = None if args or kwargs or not fuse else fused_operands(self, x)
        if operands is None:
            return super().forward(x, *args, **kwargs)
        x_in, *rest = operands
        return _LoraLinear.apply(x_in.reshape(-1, x_in.shape[-1]), *rest).view(*x.shape[:-1], -1)


def capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s CUDA stream is capturing a graph: where the fused path runs. Never while torch.compile
    traces the layer (dynamo cannot trace the query, and a graph break in every LoRA layer would cost more
    than inductor, which fuses PEFT's passes itself, leaves to gain)."""
    if torch.compiler.is_compiling():
        return False
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def fused_operands(layer: Any, x: torch.Tensor) -> tuple[Any, ...] | None:
    """``(x, W, b, A, B, scaling)`` for `_LoraLinear`, or None where PEFT's forward must run."""
    if layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (type(dropout) is nn.Dropout and not dropout.training)):
        return None
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(base) is not nn.Linear or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return None
    if lora_b.bias is not None or lora_a.bias is not None:
        return None
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return None
    # outside autocast PEFT runs the adapter in its own dtype (fp32 adapters on a bf16 model): keep that
    if not autocast and (lora_a.weight.dtype != dtype or x.dtype != dtype):
        return None
    if not x.is_floating_point() or x.shape[-1] != weight.shape[1]:
        return None
    return x.to(dtype), weight, bias, lora_a.weight, lora_b.weight, float(layer.scaling[name])


def plain_linear_targets(model: nn.Module, targets: Sequence[str]) -> bool:
    """Whether every module named by ``targets`` (short names) is exactly `nn.Linear` with a plain weight, in a
    model without a quantizer: PEFT tries a custom mapping before its own dispatchers, and quantized
    linears (bitsandbytes, a pre-quantized checkpoint, torchao) subclass `nn.Linear`."""
    config = getattr(model, "config", None)
    if getattr(model, "hf_quantizer", None) is not None or getattr(config, "quantization_config", None):
        return False
    names = set(targets)
    return all(
        type(m) is nn.Linear and type(m.weight) is nn.Parameter
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in names
    )


def register_fused_lora(config: Any) -> bool:
    """Map `nn.Linear` targets of a `LoraConfig` to the fused layer (callers check `plain_linear_targets`
    first). False (and PEFT's layers) on a PEFT without the custom-module mapping."""
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        logger.info("lora: PEFT's LoraConfig has no custom-module mapping; PEFT's own LoRA layers are used")
        return False
    register({nn.Linear: FusedLoraLinear})
    return True
