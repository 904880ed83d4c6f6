"""`tiled_mlp_tokens`: every decoder layer's MLP runs over its tokens in tiles, forward and backward.

A SwiGLU MLP's intermediates ([tokens x intermediate_size], 5.4x the hidden size for Qwen2.5-0.5B, 3.5x for
Llama 3) are the largest tensors of a layer's backward. Measured on CPU with a live-storage tracker
(Qwen2.5-0.5B layer shapes, LoRA, gradient checkpointing, 4,096 tokens), one recomputed layer's backward
held about 360 MiB next to 106 MiB of everything saved by the forward. Tiled, the MLP keeps only its input
for backward; backward recomputes it one tile at a time and takes that tile's gradients right away, so its
intermediates exist for one tile only (as DeepSpeed's ALST TiledMLP). The price is one more MLP forward.

The MLP is wrapped, not patched: `TiledMLP` registers the MLP's own submodules under their own names, so
parameter names, state dicts, adapters and saved models are unchanged, and calls the MLP class's forward
on the original module. Only dense gated MLPs (gate_proj, up_proj, down_proj, no weights of their own) are
tiled; other blocks (mixture-of-experts, ...) are left as they are and counted.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("tunesmith")

GATED = ("gate_proj", "up_proj", "down_proj")


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mlp: nn.Module, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp, ctx.tile, ctx.params = mlp, tile, params
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        # backward replays the tiles with the forward's random state (dropout in LoRA layers), as
        # checkpointing does
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([_call(mlp, part) for part in flat.split(tile)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast
        want_x = ctx.needs_input_grad[2]
        trained = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[3 + i]]
        flat, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(flat) if want_x else None
        grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        start = 0
        cpu_rng, cuda_rng = ctx.rng
        with torch.random.fork_rng(devices=[x.device] if cuda_rng is not None else []):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            for part, part_grad in zip(flat.split(ctx.tile), flat_grad.split(ctx.tile)):
                part = part.detach().requires_grad_(want_x)
                with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                    out = _call(ctx.mlp, part)
                inputs = ([part] if want_x else []) + [ctx.params[i] for i in trained]
                found = torch.autograd.grad(out, inputs, part_grad, allow_unused=True)
                if want_x:
                    grad_x[start : start + part.shape[0]] = found[0]  # type: ignore[index]
                    found = found[1:]
                for i, g in zip(trained, found):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g  # type: ignore[operator]
                start += part.shape[0]
        return (None, None, None if grad_x is None else grad_x.view_as(x), *grads)


def _call(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The wrapped MLP class's own forward."""
    return type(mlp).forward(mlp, x)


class TiledMLP(nn.Module):
    """An MLP whose forward and backward go over ``tile`` tokens at a time (see the module docstring)."""

    def __init__(self, mlp: nn.Module, tile: int) -> None:
        super().__init__()
        object.__setattr__(self, "_mlp", mlp)  # not a child: its children are this module's, by name
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.tile = tile

    def train(self, mode: bool = True) -> TiledMLP:
        super().train(mode)
        self._mlp.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.shape[:-1].numel() <= self.tile:
            return _call(self._mlp, x)  # inference, or a single tile: nothing to save
        params = tuple(self._mlp.parameters())
        return _Tiled.apply(self._mlp, self.tile, x, *params)

    def extra_repr(self) -> str:
        return f"{type(self._mlp).__name__}, tile={self.tile} tokens"


def tileable(mlp: nn.Module) -> bool:
    return all(hasattr(mlp, name) for name in GATED) and not list(mlp.parameters(recurse=False))


def tile_mlps(layers: list[nn.Module], tile: int) -> int:
    """Wrap the ``mlp`` of each decoder layer that has a dense gated one; returns how many."""
    done = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module) and not isinstance(mlp, TiledMLP) and tileable(mlp):
            layer.mlp = TiledMLP(mlp, tile)
            done += 1
    skipped = len(layers) - done
    log.info("tiled_mlp_tokens: %d decoder MLPs tiled by %d tokens%s", done, tile,
             f", {skipped} left as they are (not dense gated MLPs)" if skipped else "")  # fmt: skip
    return done
