"""Rotary position embedding of queries and keys as one Triton kernel forward and one backward.

Transformers applies RoPE with `apply_rotary_pos_emb`: ``q * cos + rotate_half(q) * sin`` for the queries and
again for the keys, on head-major views ([batch, heads, tokens, head_dim], transposed), which makes some ten
elementwise kernels forward and more backward a layer, most of them strided (unvectorised) broadcasts: on an
H200, Qwen2.5-0.5B LoRA at 1,081 tokens a step, about an eighth of the GPU time of a replayed step
(bench/results/profile_step_gpu-2026-11-29T0139Z-default-fusedlayers-h200*). `rope` rotates both, token-major
([batch, tokens, heads, head_dim], as the projections write them), one program per token reading its cos/sin
row once (a launch for the queries, one for the keys). The kernel rounds each product to the dtype before
the sum, as transformers' eager ops do (to the bit in triton's interpreter); on a GPU the compiler may still
fuse a product into the sum, which rounds once instead of twice: on an H200, 23% of bf16 values one ulp
apart, fp32 within 4.8e-7 (tests/model/test_fused_rope.py). Measured there (bench/cuda_graph_step.py --mixed,
Qwen2.5-0.5B LoRA, 8 rows, replayed): 31.2 ms a step with the norm fused, 30.0 with the SwiGLU kernel too
(another call), 26.9 with this kernel as well.

`to_fused` makes a decoder layer's attention module an instance of its class with `FusedRopeAttention`'s
forward mixed in (`fused_class`; nothing else about the module changes), which runs transformers' attention
forward with `rope` (`rope_attention_forward`). Only classes of `ROPE_ATTENTION` (Llama, Mistral, Qwen2, Qwen3),
whose forward it reproduces (how each differs from Llama's is listed there), and only after a probe shows the wrapper gives
the class's own output; a call with a KV cache (generation) runs the class's own forward. The kernels run on
CUDA tensors with triton installed, outside torch.compile; elsewhere `rope` is the eager math. Importing this
module never imports triton: `_kernels` does, on first use.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tunesmith.model.layer_probe import compute_dtype, evaluating, mismatch, swap_layers, unmaterialised
from tunesmith.triton_build import build

tl: Any = None  # triton.language, bound by `triton_build.build` (the kernels' source resolves `tl` here)


@dataclass(frozen=True)
class RopeAttention:
    """How an attention class's forward differs from Llama's, which `FusedRopeAttention.forward` follows."""

    window: str | None = None  # the sliding window it passes to the kernel: "module" (its own), "config"
    qk_norm: bool = False  # q_norm / k_norm on each projected head before the rotation


# Attention classes whose forward `FusedRopeAttention.forward` reproduces (read in transformers 5.17 and 5.24;
# the probe checks each class's numbers at start).
ROPE_ATTENTION: dict[str, RopeAttention] = {
    "LlamaAttention": RopeAttention(),
    "MistralAttention": RopeAttention(window="config"),
    "Qwen2Attention": RopeAttention(window="module"),
    "Qwen3Attention": RopeAttention(window="module", qk_norm=True),
}


def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, tokens, cos_rows,
    H: tl.constexpr, HALF: tl.constexpr, PH: tl.constexpr, PD: tl.constexpr, BACKWARD: tl.constexpr,
):  # noqa: N803  # fmt: skip
    """Token t (program 0) of x [B x tokens, H, 2 HALF] with cos/sin [B or 1, tokens, 2 HALF] (``cos_rows``:
    tokens a batch row of cos/sin apart, 0 when one row serves the batch), each product rounded to the output
    dtype before the sum, as transformers' eager ops round them:
    forward  out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2;
    backward (the transposed rotation of the gradient) out1 = x1 c1 + x2 s2,  out2 = x2 c2 - x1 s1."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, PD)
    inside_d = d < HALF
    row = ((t // tokens) * cos_rows + t % tokens) * (2 * HALF)
    c1 = tl.load(cos_ptr + row + d, mask=inside_d, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + row + HALF + d, mask=inside_d, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + row + d, mask=inside_d, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + row + HALF + d, mask=inside_d, other=0.0).to(tl.float32)[None, :]
    h = tl.arange(0, PH)
    offs = t * H * (2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    mask = (h[:, None] < H) & inside_d[None, :]
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    a1 = (x1 * c1).to(ty).to(tl.float32)
    a2 = (x2 * c2).to(ty).to(tl.float32)
    if BACKWARD:
        o1 = a1 + (x2 * s2).to(ty).to(tl.float32)
        o2 = a2 - (x1 * s1).to(ty).to(tl.float32)
    else:
        o1 = a1 - (x2 * s1).to(ty).to(tl.float32)
        o2 = a2 + (x1 * s2).to(ty).to(tl.float32)
    tl.store(out_ptr + offs, o1.to(ty), mask=mask)
    tl.store(out_ptr + offs + HALF, o2.to(ty), mask=mask)


@dataclass(frozen=True)
class _Kernels:
    rope: Any
    interpreted: bool  # TRITON_INTERPRET was on when it was built: it runs on CPU tensors too


@functools.cache
def _kernels() -> _Kernels | None:
    """The jit kernel, built once a process (`triton_build.build`); None without triton."""
    # the token counts are the grid's and index math only: never specialised (a variant compiled mid-capture)
    built = build(globals(), [(_rope_kernel, {"do_not_specialize": ["tokens", "cos_rows"]})], "fused rope")
    return None if built is None else _Kernels(built.fns[0], built.interpreted)


def kernel_ready(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` runs the kernel: q [B, T, Hq, D] and k [B, T, Hk, D] of one floating dtype, cos/sin
    [B or 1, T, D] of one floating dtype (no gradient), D even, all on one device; on a GPU (or in triton's
    interpreter, for tests), not while torch.compile traces."""
    if torch.compiler.is_compiling() or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    b, t, _, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or d % 2 or cos.shape[0] not in (1, b):
        return False
    if cos.shape[1:] != (t, d) or sin.shape != cos.shape or q.dtype != k.dtype or cos.dtype != sin.dtype:
        return False
    if not (q.is_floating_point() and cos.is_floating_point()) or cos.requires_grad or sin.requires_grad:
        return False
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        return False
    kernels = _kernels()
    return kernels is not None and (q.is_cuda or kernels.interpreted)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, backward: bool):
    """x [B, T, H, D] through the kernel (cos/sin contiguous [B or 1, T, D]), written in ``out_dtype``."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    b, t, h, d = x.shape
    if b * t:
        _kernels().rope[(b * t,)](  # type: ignore[union-attr]
            x, cos, sin, out, t, t if cos.shape[0] > 1 else 0,
            H=h, HALF=d // 2, PH=_pow2(h), PD=_pow2(d // 2), BACKWARD=backward, num_warps=4,
        )  # fmt: skip
    return out


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Rope(torch.autograd.Function):
    """Outputs in the dtype transformers' products promote to (a bf16 q with fp32 cos/sin: fp32, as in full
    fine-tuning under autocast); gradients in the inputs' dtype, as autograd casts them."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.dtype = q.dtype
        out = torch.promote_types(q.dtype, cos.dtype)
        return _rotate(q, cos, sin, out, False), _rotate(k, cos, sin, out, False)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None) -> Any:
        cos, sin = ctx.saved_tensors
        want_q, want_k = ctx.needs_input_grad[:2]
        gq = _rotate(dq, cos, sin, ctx.dtype, True) if want_q and dq is not None else None
        gk = _rotate(dk, cos, sin, ctx.dtype, True) if want_k and dk is not None else None
        return gq, gk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries [B, T, Hq, D] and keys [B, T, Hk, D] rotated by cos/sin [B, T, D] as transformers'
    `apply_rotary_pos_emb` does: the Triton kernel where `kernel_ready`, else the same eager math."""
    if kernel_ready(q, k, cos, sin):
        return _Rope.apply(q, k, cos, sin)
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # token-major: the heads are dimension 2


class FusedRopeAttention(nn.Module):
    """The class an attention module of a `ROPE_ATTENTION` class becomes (`fused_class`: this mixin over its
    own class): its forward with `rope`; a call with a KV cache (generation; transformers 5.17 names it
    ``past_key_values``, 5.24 ``cache``) runs the class's own. The module stays an instance of its class, with
    its own children and attributes: nothing is copied, so PEFT's unload and merge, a child swapped later, and
    transformers' isinstance checks (``output_attentions``) see it as before."""

    rope_kind: RopeAttention  # set on each class `fused_class` makes, with the transformers class it extends
    rope_base: type

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        cached = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
        if cached or position_embeddings is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)  # type: ignore[misc]
        return rope_attention_forward(
            self, self.rope_kind, hidden_states, position_embeddings, attention_mask, **kwargs
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickled (and deep-copied) as its transformers class, made fused again when loaded
        return (_restore, (self.rope_base, self.__dict__.copy()))


_FUSED_CLASSES: dict[type, type] = {}  # transformers class -> its fused class, made once a process


def fused_class(cls: type) -> type:
    """``cls`` (a `ROPE_ATTENTION` class) with `FusedRopeAttention`'s forward."""
    if cls not in _FUSED_CLASSES:
        namespace = {"rope_kind": ROPE_ATTENTION[cls.__name__], "rope_base": cls, "__module__": __name__}
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedRopeAttention, cls), namespace)
    return _FUSED_CLASSES[cls]


def _restore(base: type, state: dict[str, Any]) -> nn.Module:
    module = base.__new__(base)
    module.__dict__.update(state)
    module.__class__ = fused_class(base)
    return module


def to_fused(attention: nn.Module) -> nn.Module:
    """``attention`` itself, its class now `fused_class` of its own."""
    attention.__class__ = fused_class(type(attention))
    return attention


def rope_attention_forward(
    module: nn.Module, kind: RopeAttention, hidden_states: torch.Tensor, position_embeddings: Any,
    attention_mask: Any, **kwargs: Any,
) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """transformers' Llama attention forward (with ``kind``'s differences), the rotation by `rope`."""
    kwargs.pop("past_key_values", None)
    kwargs.pop("cache", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape)
    key = module.k_proj(hidden_states).view(hidden_shape)
    if kind.qk_norm:
        query, key = module.q_norm(query), module.k_norm(key)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = rope(query, key, cos, sin)
    window = {}
    if kind.window == "module":
        window = {"sliding_window": module.sliding_window}
    elif kind.window == "config":
        window = {"sliding_window": getattr(module.config, "sliding_window", None)}
    out, weights = _attention_interface(module)(
        module, query.transpose(1, 2), key.transpose(1, 2), value, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout, scaling=module.scaling, **window, **kwargs,
    )  # fmt: skip
    out = out.reshape(*input_shape, -1).contiguous()
    return module.o_proj(out), weights


def _attention_interface(module: nn.Module) -> Any:
    """The attention kernel transformers would call for ``module``: the registered one of the model's
    implementation, else the model file's eager forward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cls = module.rope_base if isinstance(module, FusedRopeAttention) else type(module)
    eager = importlib.import_module(cls.__module__).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)


@torch.no_grad()
def probe(attention: nn.Module) -> str | None:
    """None when `rope_attention_forward` gives ``attention``'s own output on random tokens and rotations (in
    its compute dtype and device, through the kernel where it would run); else why not."""
    cls = type(attention)
    if cls.__name__ not in ROPE_ATTENTION or not cls.__module__.startswith("transformers.models."):
        return "not an attention class whose forward the fused one reproduces"
    reason = unmaterialised(attention)
    if reason is not None:
        return reason
    weight = next(attention.parameters())
    try:
        with evaluating(attention):
            gen = torch.Generator().manual_seed(0)
            hidden = attention.q_proj.in_features
            x = torch.randn(1, 7, hidden, generator=gen).to(weight.device, compute_dtype(attention))
            angles = torch.rand(1, 7, attention.head_dim // 2, generator=gen) * 6.3
            angles = torch.cat((angles, angles), dim=-1)
            rotation = (angles.cos().to(x), angles.sin().to(x))
            want = type(attention).forward(attention, x, rotation, None)[0]
            got = rope_attention_forward(attention, ROPE_ATTENTION[cls.__name__], x, rotation, None)[0]
    except Exception as e:  # noqa: BLE001 - an attention that cannot be probed keeps its own code
        return f"probe failed: {type(e).__name__}: {str(e)[:200]}"
    return mismatch(want, got, 8, "the class's forward")


def fuse_rope_attention(layers: list[nn.Module]) -> tuple[int, dict[str, str]]:
    """Make the ``self_attn`` of each decoder layer whose class passes `probe` fused (`to_fused`); returns
    (swapped, {class kept: why})."""
    return swap_layers(layers, "self_attn", FusedRopeAttention, probe, swap=to_fused)
