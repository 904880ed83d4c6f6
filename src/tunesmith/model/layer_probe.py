"""What the fused-layer swaps share (`fused_norm`, `fused_swiglu`, `fused_rope`): a layer class is swapped only
after a probe shows the replacement gives the class's own output, within a few roundings of its dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def mismatch(want: Any, got: torch.Tensor, ulps: int, what: str) -> str | None:
    """None when ``got`` is ``want`` within ``ulps`` roundings of its dtype, relative to each row's largest
    value (1e-5 at least: fp32's reductions may run in another order); else how far, naming ``what``."""
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        shape = tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__
        return f"returns {shape} {getattr(want, 'dtype', '')}, {what} {tuple(got.shape)} {got.dtype}"
    tol = max(ulps * torch.finfo(want.dtype).eps, 1e-5)
    row_scale = want.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
    worst = ((want.float() - got.float()).abs() / row_scale).max().item()
    if not worst <= tol:
        return f"differs from {what} by {worst:.3g} of a row's largest value (tolerance {tol:.3g})"
    return None


def unmaterialised(module: nn.Module) -> str | None:
    """Why ``module``'s weights cannot be probed (none, on the meta device, or a ZeRO-3 shard), or None."""
    weight = next(module.parameters(), None)
    if weight is None or weight.device.type == "meta" or weight.numel() == 0:
        return "weights not materialised (sharded or on the meta device)"
    return None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in, for a probe's inputs: its frozen floating weights' (a LoRA model's
    base), a 4-bit layer's compute dtype (QLoRA, whose stored weights are integers), else its first floating
    parameter's; fp32 without any."""
    params = [p for p in module.parameters() if p.is_floating_point()]
    frozen = [p for p in params if not p.requires_grad]
    if frozen:
        return frozen[0].dtype
    quantized = [
        m.compute_dtype
        for m in module.modules()
        if isinstance(getattr(m, "compute_dtype", None), torch.dtype)
    ]
    if quantized:
        return quantized[0]
    return params[0].dtype if params else torch.float32


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block (no dropout: two forwards must see one function)."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def swap_layers(
    layers: list[nn.Module], attr: str, fused: type[nn.Module], probe: Callable[[nn.Module], str | None],
    reason: Callable[[nn.Module], str | None] = lambda m: None, swap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[int, dict[str, str]]:  # fmt: skip
    """Replace ``layer.<attr>`` of each layer by ``swap(module)`` (default: ``fused(module)``) where
    ``reason(module)`` is None and the module's class passes ``probe`` (probed once a class); modules already
    ``fused`` are left alone. Returns (swapped, {class kept: why})."""
    make = swap or fused
    verdicts: dict[type, str | None] = {}
    done, kept = 0, {}
    for layer in layers:
        module = getattr(layer, attr, None)
        if not isinstance(module, nn.Module) or isinstance(module, fused):
            continue
        why = reason(module)
        if why is None:
            if type(module) not in verdicts:
                verdicts[type(module)] = probe(module)
            why = verdicts[type(module)]
        if why is not None:
            kept[type(module).__name__] = why
            continue
        setattr(layer, attr, make(module))
        done += 1
    return done, kept
