"""`fused_layers`: a training model's RMSNorm layers, gated SiLU MLPs and rotary attention use fused kernels.

Three swaps, each taken per layer class only where a probe at start shows it gives the class's own numbers
(`fused_norm`: torch's rms_norm; `fused_swiglu`: one Triton kernel each way for ``silu(gate) * up``;
`fused_rope`: one Triton kernel each way for the queries' and keys' rotary embedding). All keep every
parameter under its own name, so optimizers, adapters, state dicts and saved models see no change.
What was swapped, and each class kept with the reason, is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    attentions: int = 0  # decoder attentions wrapped (rotary embedding kernel)
    kept: dict[str, str] = field(default_factory=dict)  # class -> why it keeps its code

    def describe(self) -> str:
        norms = ", ".join(f"{n} {c}" for c, n in self.norms.items())
        parts = [f"{sum(self.norms.values())} RMSNorm layers as torch's rms_norm" + (f" ({norms})" if norms else ""),
                 f"{self.mlps} MLPs as one SwiGLU kernel each way",
                 f"{self.attentions} attentions with one RoPE kernel each way"]  # fmt: skip
        parts += [f"{cls} kept ({why})" for cls, why in self.kept.items()]
        return "; ".join(parts)


def fuse_layers(model: nn.Module) -> FusedLayers:
    """Swap ``model``'s RMSNorm layers and its decoder layers' gated MLPs and rotary attention where their
    probes pass; logs it."""
    norms = fuse_rms_norms(model)
    layers = decoder_layers(model)
    mlps, kept = fuse_swiglu_mlps(layers)
    attentions, kept_attention = fuse_rope_attention(layers)
    done = FusedLayers(norms.swapped, mlps, attentions, {**norms.kept, **kept, **kept_attention})
    log.info("fused layers: %s", done.describe())
    return done
