"""`fused_rms_norm`: a model's RMSNorm layers run as torch's own `rms_norm` times their weight.

Transformers' RMSNorm (Llama, Qwen2/3, Mistral, ...) is written out in eager ops: a cast to fp32, a square, a
mean, an add, a rsqrt, a product, a cast back and the weight's product, about ten kernels forward and more
backward for each of a model's 2 x layers + 1 norms. `torch.nn.functional.rms_norm` does the same math (in
fp32 for a bf16 input, rounded once to the input's dtype) in one kernel each way on a GPU. Measured on an
H200 (bench/cuda_graph_step.py, Qwen2.5-0.5B LoRA, 8 rows, replayed CUDA graph): 37.0 -> 32.4 ms a step, the
same losses.

The layers are swapped, not patched: `FusedRMSNorm` holds the original layer's own `weight` parameter under
the same name, so parameter names, state dicts, optimizers, adapters and saved models are unchanged. A layer
class is swapped only after a probe shows it computes `weight * rms_norm(x)`: a copy of one of its layers,
with a random weight, is run against `FusedRMSNorm` on random rows (a zero row included, for eps). A variant
that differs (Gemma's `1 + weight`, an offset, a bias, extra buffers) fails the probe and keeps its own code;
each class's verdict is logged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.model.layer_probe import mismatch, unmaterialised


class FusedRMSNorm(nn.Module):
    """``weight * rms_norm(x)`` over the last dimension, with ``norm``'s weight parameter (shared, not copied)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = eps_of(norm) or 0.0
        self.replaces = type(norm).__name__  # for repr and logs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers: weight * (x in fp32 normalised).to(x.dtype); torch's rms_norm upcasts a reduced
        # dtype inside the kernel and returns x's dtype
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, replaces={self.replaces}"


@dataclass
class NormSwap:
    """What `fuse_rms_norms` did: layers swapped per class, and the classes kept with the reason."""

    swapped: dict[str, int] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def eps_of(norm: nn.Module) -> float | None:
    """The layer's epsilon (transformers names it ``variance_epsilon`` or ``eps``); None without one."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float | int) and not isinstance(value, bool):
            return float(value)
    return None


def _shape_reason(norm: nn.Module) -> str | None:
    """Why ``norm`` cannot be a `FusedRMSNorm` by its parts alone; None when it may be (the probe decides)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return "no 1-D weight parameter"
    own = [n for n, _ in norm.named_parameters(recurse=True)]
    if own != ["weight"] or list(norm.buffers()) or list(norm.children()):
        return f"parameters {own}, buffers or sublayers besides its weight"
    if eps_of(norm) is None:
        return "no eps attribute"
    return unmaterialised(norm)


@torch.no_grad()
def probe(norm: nn.Module) -> str | None:
    """None when ``norm``'s class computes what `FusedRMSNorm` computes (a copy of it with a random weight,
    on random rows and a zero row, in its own dtype and device); else how it differs."""
    reason = _shape_reason(norm)
    if reason is not None:
        return reason
    twin = copy.deepcopy(norm)
    gen = torch.Generator(device="cpu").manual_seed(0)
    dim = twin.weight.shape[0]
    twin.weight.copy_(torch.randn(dim, generator=gen) * 0.5 + 1.0)
    x = torch.randn(4, dim, generator=gen) * torch.tensor([[1.0], [30.0], [1e-3], [0.0]])
    x = x.to(twin.weight.device, twin.weight.dtype)
    try:
        want = twin(x)
        got = FusedRMSNorm(twin)(x)
    except Exception as e:  # noqa: BLE001 - a layer that cannot be probed keeps its own code
        return f"probe failed: {type(e).__name__}: {e}"
    # a rounding or two of the output's dtype apart at most, far below what any other formula gives
    # (Gemma's 1 + weight, eps outside the root, a mean subtracted)
    return mismatch(want, got, 4, "weight * rms_norm(x)")


def _candidate(cls: type) -> bool:
    """A transformers RMSNorm class (its library's or a checkpoint's remote code): never another library's
    kernel layer (Liger's LigerRMSNorm, say), which the user chose."""
    return cls.__name__.endswith("RMSNorm") and cls.__module__.split(".")[0] in (
        "transformers",
        "transformers_modules",
    )


def fuse_rms_norms(model: nn.Module) -> NormSwap:
    """Swap every layer of ``model`` whose class is named ``*RMSNorm`` and passes `probe` for a
    `FusedRMSNorm` holding its weight; a class that fails keeps its layers. Returns what it did."""
    found = [(n, m) for n, m in model.named_modules() if n and _candidate(type(m))]
    verdicts: dict[type, str | None] = {}
    swap = NormSwap()
    for name, norm in found:
        cls = type(norm)
        if cls not in verdicts:
            verdicts[cls] = probe(norm)
        reason = verdicts[cls] or _shape_reason(norm)  # a layer of a passing class may still be unlike it
        if reason is not None:
            swap.kept[cls.__name__] = reason
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, FusedRMSNorm(norm))
        swap.swapped[cls.__name__] = swap.swapped.get(cls.__name__, 0) + 1
    return swap
