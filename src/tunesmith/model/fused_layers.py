"""`fused_layers`: a training model's RMSNorm layers, gated SiLU MLPs and rotary attention use fused kernels.

Three swaps, each taken per layer class only where a probe at start shows it gives the class's own numbers
(`fused_norm`: torch's rms_norm; `fused_swiglu`: one Triton kernel each way for ``silu(gate) * up``;
`fused_rope`: one Triton kernel each way for the queries' and keys' rotary embedding). All keep every
parameter under its own name, so optimizers, adapters, state dicts and saved models see no change.
What was swapped, and each class kept with the reason, is logged once.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from tunesmith.model.compile import decoder_layers
from tunesmith.model.fused_norm import fuse_rms_norms
from tunesmith.model.fused_rope import fuse_rope_attention
from tunesmith.model.fused_swiglu import fuse_swiglu_mlps

log = logging.getLogger("tunesmith")


@dataclass
class FusedLayers:
    norms: dict[str, int] = field(default_factory=dict)  # swapped RMSNorm layers per class
    mlps: int = 0  # decoder MLPs wrapped
    attentions: int = 0  # decoder attentions made fused (rotary embedding kernel)
    kept: dict[str, str] = field(default_factory=dict)  # class -> why it keeps its code
    kernels: str = ""  # where the SwiGLU and RoPE kernels run, or why their eager math runs instead

    def describe(self) -> str:
        norms = ", ".join(f"{n} {c}" for c, n in self.norms.items())
        parts = [f"{sum(self.norms.values())} RMSNorm layers as torch's rms_norm" + (f" ({norms})" if norms else ""),
                 f"{self.mlps} MLPs as one SwiGLU kernel each way",
                 f"{self.attentions} attentions with one RoPE kernel each way"]  # fmt: skip
        if self.kernels:
            parts.append(self.kernels)
        parts += [f"{cls} kept ({why})" for cls, why in self.kept.items()]
        return "; ".join(parts)


def kernels_here(model: nn.Module) -> str:
    """Where the Triton kernels of the swapped MLPs and attentions will run for ``model``."""
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cuda":
        return "their eager math runs (the kernels need a CUDA device)"
    if importlib.util.find_spec("triton") is None:
        return "their eager math runs (the kernels need triton: pip install triton)"
    return "Triton kernels on the GPU"


def all_ranks(ok: bool) -> bool:
    """``ok`` on every rank of the process group (the minimum over ranks), or ``ok`` itself without one."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return ok
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def fuse_layers(model: nn.Module) -> FusedLayers | None:
    """Swap ``model``'s RMSNorm layers and its decoder layers' gated MLPs and rotary attention where their
    probes pass; logs it. In a process group, only when every rank holds its weights: a rank that loaded on
    the meta device (FSDP's CPU-RAM-efficient loading) would keep every class where the others swap them.
    None when skipped."""
    materialised = all(p.device.type != "meta" and p.numel() > 0 for p in model.parameters())
    if not all_ranks(materialised):
        log.info("fused layers: off (a rank holds no weights at start: sharded or meta-device loading)")
        return None
    norms = fuse_rms_norms(model)
    layers = decoder_layers(model)
    mlps, kept = fuse_swiglu_mlps(layers)
    attentions, kept_attention = fuse_rope_attention(layers)
    kernels = kernels_here(model) if mlps or attentions else ""
    done = FusedLayers(norms.swapped, mlps, attentions, {**norms.kept, **kept, **kept_attention}, kernels)
    log.info("fused layers: %s", done.describe())
    return done
