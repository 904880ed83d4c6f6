"""`flash_attn: varlen`: each document of a batch attends on its own, with no mask and no padding work.

sdpa trains a packed row with a dense [rows, 1, L, L] block-diagonal mask, so its memory-efficient kernel
computes every query-key block, across documents too. On an H200 that was 46% of the GPU time of a
compiled LoRA step of the Qwen2.5-0.5B architecture at 2048 tokens a row
(bench/results/profile_step_gpu-2026-11-28T0518Z-compile-h200-*).

Here the collator sends each batch's document boundaries (``cu_seq_lens_q``: cumulative lengths over the
flattened [rows x L] tokens, int32, computed on the CPU, so no device sync) with the batch, transformers
hands them to the attention function of every layer, and PyTorch's own flash-attention varlen kernel
(`torch.nn.attention.varlen.varlen_attn`, no flash-attn package needed) runs each document causally on
its own. A batch's rows, packed or not, are put back to back in one row with no padding between them
(`CausalLMCollator`; padding to a multiple at the end is one more document, all labels -100). The
attention still takes [rows x L] batches with boundaries over the flattened tokens.

Calls without those boundaries (generation with a KV cache, the loss probe, DPO's collator) take an exact
path: SDPA with a boolean mask built from the 2-D padding mask and, for packed rows, from the position
ids (causal, bottom-right aligned). On CPU, which has no flash kernel, the documents run one by one
through SDPA (`reference_varlen`): the same numbers, for tests and CPU runs.

The function is registered under ``ATTN_NAME`` with transformers' documented `AttentionInterface`.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError

ATTN_NAME = "tunesmith_varlen"
logger = logging.getLogger(__name__)


def available() -> bool:
    """PyTorch ships the varlen attention API (torch >= 2.10)."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


def head_dim(config: Any) -> int:
    """The attention head size of a model config."""
    text = config.get_text_config()
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def register(
    *, cuda: bool = False, dtype: torch.dtype = torch.bfloat16, head_size: int = 64, kernel: str = "auto"
) -> str:
    """Register the attention with transformers (idempotent); returns its attn_implementation.

    With ``cuda``, one tiny forward + backward through the flash kernel first, so a torch whose varlen
    attention cannot train (no backward, no kernel for this GPU) fails here with the fix, not mid-run.
    ``kernel`` is `varlen_kernel` (see `fa4.choose`).
    """
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    api = KernelApi.of(varlen_attn)
    if cuda:
        preflight(api, dtype, head_size)
    from tunesmith.model import fa4

    chosen = fa4.choose(kernel, api, cuda=cuda, dtype=dtype, head_size=head_size)
    if cuda:
        logger.info(
            "flash_attn: varlen kernel: %s",
            f"fa4 (flash-attn-4 {fa4.version()})"
            if chosen == "fa4"
            else f"torch (PyTorch {torch.__version__})",
        )
    AttentionInterface.register(ATTN_NAME, make_attention_forward(api, chosen))
    # The 2-D padding mask (None when nothing is padded), as flash-attention gets it; a name missing here
    # would make transformers drop the mask altogether.
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
    return ATTN_NAME


def uses_attention_interface(config: Any) -> bool | None:
    """Whether transformers' class for this config calls attention through AttentionInterface (where varlen
    is registered); None when the class is not transformers' own (remote code, unknown config)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "auto_map", None):
        return None
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    return bool(getattr(cls, "_supports_attention_backend", False))


def unsupported(config: Any) -> list[str]:
    """What of this model's attention varlen cannot compute (empty: it can)."""
    text = config.get_text_config()
    own = (
        ["its own attention code, not transformers' attention interface (varlen would be ignored)"]
        if uses_attention_interface(config) is False
        else []
    )
    return own + [
        what
        for what, on in (
            (
                "attention logit soft-capping (attn_logit_softcapping)",
                getattr(text, "attn_logit_softcapping", None),
            ),
            ("attention dropout (attention_dropout)", getattr(text, "attention_dropout", 0.0)),
            ("encoder (non-causal) attention", getattr(text, "is_encoder_decoder", False)),
        )
        if on
    ]


def check_model(config: Any) -> None:
    """Refuse, right after loading, a model whose attention varlen cannot compute (rather than at the
    first forward, after the data is prepared)."""
    found = unsupported(config)
    if found:
        raise TunesmithError(
            f"flash_attn: varlen: {type(config).__name__} uses {', '.join(found)}, which varlen attention does "
            "not compute. Fix: use flash_attn: sdpa (or auto)"
        )


@dataclass(frozen=True)
class KernelApi:
    """What this torch's ``varlen_attn`` takes: ``window_size`` (else torch 2.10's ``is_causal``), ``scale``,
    ``enable_gqa``. Read once, outside any compiled code."""

    window: bool
    scale: bool
    gqa: bool

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> KernelApi:
        params = inspect.signature(fn).parameters
        return cls(window="window_size" in params, scale="scale" in params, gqa="enable_gqa" in params)


def preflight(api: KernelApi, dtype: torch.dtype, head_dim: int = 64) -> None:
    """Forward + backward of two short documents on the current GPU at the model's head size (flash's
    backward has no kernel for some sizes on some GPUs); TunesmithError with the fix if not."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise TunesmithError(
            f"flash_attn: varlen runs flash attention, which takes bf16 or fp16, not {dtype}. "
            "Fix: train in bf16 (the default on capable GPUs), or use flash_attn: sdpa"
        )
    try:
        q, k, v = (
            torch.randn(24, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)
        )
        cu = torch.tensor([0, 10, 24], device="cuda", dtype=torch.int32)
        flash_varlen(q, k, v, cu, 14, head_dim**-0.5, None, api).float().sum().backward()
        torch.cuda.synchronize()
    except Exception as e:  # any failure of the kernel: say which torch and what to do
        raise TunesmithError(
            f"flash_attn: varlen: PyTorch {torch.__version__}'s varlen attention failed a forward + backward on "
            f"{torch.cuda.get_device_name()}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Fix: use flash_attn: sdpa (or upgrade torch)"
        ) from e


def kernel_inputs(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in a dtype the flash kernel takes: fp32 activations (full fine-tuning keeps fp32 weights under
    bf16/fp16 autocast, and RoPE's fp32 cos/sin upcast q and k) go to the autocast dtype, as SDPA's would."""
    if xs[0].dtype in (torch.float16, torch.bfloat16) and all(x.dtype == xs[0].dtype for x in xs):
        return xs
    kind = xs[0].device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return tuple(x.to(dtype) for x in xs)
    raise TunesmithError(
        f"flash_attn: varlen computes attention in bf16 or fp16, but this step runs it in "
        f"{', '.join(sorted({str(x.dtype) for x in xs}))} "
        "without mixed precision. Fix: set bf16: true (or fp16: true), or use flash_attn: sdpa"
    )


def flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float,
    window: int | None, api: KernelApi,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of each document: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D] (CUDA flash kernel)."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = kernel_inputs(q, k, v)
    kw: dict[str, Any] = {}
    if api.window:
        kw["window_size"] = (window - 1 if window else -1, 0)
    elif window:
        raise TunesmithError(
            f"flash_attn: varlen: this model uses sliding-window attention ({window} tokens), which PyTorch "
            f"{torch.__version__}'s varlen attention cannot restrict. Fix: upgrade torch, or use flash_attn: sdpa"
        )
    else:
        kw["is_causal"] = True
    if api.scale:
        kw["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if api.gqa:
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float,
    window: int | None,
) -> torch.Tensor:  # fmt: skip
    """`flash_varlen`'s numbers without a flash kernel: each document through SDPA in turn (CPU)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        if window is None:  # causal without a mask: a kernel whose saved memory is linear, as flash's is
            kd, vd = (x.repeat_interleave(qd.shape[0] // x.shape[0], dim=0)[None] for x in (kd, vd))
            o = F.scaled_dot_product_attention(qd[None], kd, vd, is_causal=True, scale=scale)[0]  # 4-D: flash
        else:
            mask = _causal(end - start, end - start, window, q.device)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale,
                                               enable_gqa=kd.shape[0] != qd.shape[0])  # fmt: skip
        out[start:end] = o.transpose(0, 1)
    return out


def _causal(q_len: int, kv_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool: key j visible to query i (bottom-right aligned), within the window if any."""
    qi = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    kj = torch.arange(kv_len, device=device)[None, :]
    allowed = kj <= qi
    if window:
        allowed &= kj > qi - window
    return allowed


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None, scale: float, window: int | None,
) -> torch.Tensor:  # fmt: skip
    """Exact attention for calls without boundaries: q [B, H, q, D], k/v [B, Hkv, kv, D] -> [B, q, H, D].

    The boolean mask combines causality (bottom-right aligned, so a KV cache works), the 2-D padding mask
    (``attention_mask`` [B, kv]) and, for packed rows (``q == kv``), same-document from the position ids.
    """
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    mask = _causal(q_len, kv_len, window, query.device)[None, None]  # [1, 1, q, kv]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise TunesmithError(
                f"flash_attn: varlen: got a {attention_mask.dim()}-D attention mask; it takes the 2-D padding "
                "mask. Fix: use flash_attn: sdpa for custom 4-D masks"
            )
        mask = mask & attention_mask[:, None, None, -kv_len:].bool()
    if position_ids is not None and q_len == kv_len:
        pos = position_ids.expand(b, -1)
        doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)  # [B, L]
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    # A query that sees no key (a left-padding position) would give NaN, which its value then carries into
    # real tokens' sums (0 x NaN): let it see every key instead, as transformers' SDPA mask does.
    mask = mask | ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                         enable_gqa=key.shape[1] != query.shape[1])  # fmt: skip
    return out.transpose(1, 2)


def make_attention_forward(api: KernelApi, kernel: str = "torch") -> Callable[..., tuple[torch.Tensor, None]]:
    """transformers' attention interface function, bound to this torch's kernel API and the CUDA kernel
    (`fa4.choose`)."""
    if kernel == "fa4":
        from tunesmith.model.fa4 import fa4_varlen

        def cuda_kernel(*a: Any) -> torch.Tensor:
            q, k, v = kernel_inputs(*a[:3])
            return fa4_varlen(q, k, v, *a[3:])
    else:

        def cuda_kernel(*a: Any) -> torch.Tensor:
            return flash_varlen(*a, api)

    def varlen_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        is_causal: bool | None = None,
        s_aux: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """q [B, H, L, D], k/v [B, Hkv, L, D] -> ([B, L, H, D], None)."""
        unsupported = {
            "attention dropout": dropout and module.training,
            "logit soft-capping": softcap,
            "attention sinks": s_aux is not None,
            "non-causal attention": is_causal is False or getattr(module, "is_causal", True) is False,
        }
        found = [name for name, on in unsupported.items() if on]
        if found:
            raise TunesmithError(
                f"flash_attn: varlen: this model uses {', '.join(found)}, which varlen attention does not "
                "compute. Fix: use flash_attn: sdpa (or auto)"
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        cu = kwargs.get("cu_seq_lens_q")
        b, h, length, d = query.shape
        if cu is None or key.shape[2] != length:
            position_ids = kwargs.get("position_ids")
            out = masked_attention(query, key, value, attention_mask, position_ids, scale, sliding_window)
            return out, None
        flat = [x.transpose(1, 2).reshape(b * length, x.shape[1], d) for x in (query, key, value)]
        cu = cu.to(device=query.device, dtype=torch.int32)
        max_len = int(kwargs.get("max_length_q") or length)
        if query.is_cuda:
            out = cuda_kernel(*flat, cu, max_len, scale, sliding_window)
        else:
            out = reference_varlen(*flat, cu, max_len, scale, sliding_window)
        return out.view(b, length, h, d), None

    return varlen_attention_forward
