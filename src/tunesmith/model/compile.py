"""torch.compile per decoder layer ("regional" compilation), for the `torch_compile` key.

Why per layer: a training step of a small model is host-bound. Eager PyTorch launches every norm, RoPE,
activation, LoRA cast/scale/add and residual as its own kernel, some 9,000 launches per LoRA step of a
24-layer model (bench/profile_step_gpu.py), and the GPU waits on Python. Compiling one decoder layer fuses
those element-wise ops into a few Triton kernels, and every layer of the stack reuses the one compiled
graph (the layers share code; their weights are graph inputs), so compiling costs seconds per distinct
input shape, not per layer. Transformers' own `torch_compile` compiles the whole model instead: a graph
per model that gradient checkpointing, PEFT wrappers and the loss split into many pieces.

The layers are compiled in place (`Module.compile`), so parameter names, state dicts, checkpoints and the
saved model are unchanged. The graph is compiled with dynamic shapes from the start: batch shapes vary
(unpadded batches, packed rows), and a recompile triggered by a new length in the middle of a run would
stall it for as long as the first compile.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tunesmith")


def compile_backend(hf: dict[str, Any]) -> str | None:
    """The torch.compile backend of a run's `hf` keys (`torch_compile_backend`, inductor by default), or None
    without `torch_compile`. The decoder layers and the fused loss head's chunk math use it."""
    return (hf.get("torch_compile_backend") or "inductor") if hf.get("torch_compile") else None


# torch.compile's modes -> whether the mode records CUDA graphs (inductor's `triton.cudagraphs`)
KNOWN_MODES = {
    "default": False,
    "reduce-overhead": True,
    "max-autotune": True,
    "max-autotune-no-cudagraphs": False,
}


def compile_modes(mode: str) -> dict[str, bool]:
    """Modes -> whether each records CUDA graphs: `KNOWN_MODES` when it names ``mode`` (no torch import, for
    loading a config), else the installed torch's own table, so a newer torch's modes are known too."""
    if mode in KNOWN_MODES:
        return KNOWN_MODES
    from torch._inductor import list_mode_options

    return {m: bool(options.get("triton.cudagraphs")) for m, options in list_mode_options().items()}


# Inductor options that keep a compiled layer from guarding on the token count. Its mix-order reduction
# (a norm's backward: the row reduction and the weight gradient's column reduction in one kernel) is
# chosen only for >= 4096 rows, and that check guards the graph on the size: a smaller batch, an epoch's
# last, then recompiles every layer mid-run (5.2 s of a 60-step full-SFT Llama-3.2-1B run on an H200,
# bench/results/step_times-2026-11-28T1536Z-h200.json). Non-strict mode skips that size heuristic (and
# two like it), so the one graph serves every size; only a small batch's kernel choice differs.
NO_SIZE_GUARDS = {"triton.mix_order_reduction_non_strict_mode": True}


def compile_kwargs(mode: str | None, backend: str) -> dict[str, Any]:
    """`torch.compile`'s mode/options for a decoder layer: inductor gets its mode's options plus
    `NO_SIZE_GUARDS` (where this torch has them); another backend gets the mode as it is."""
    if backend != "inductor":
        return {"mode": mode}
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    if not all(_known(inductor_config, key) for key in NO_SIZE_GUARDS):
        return {"mode": mode}
    return {"options": {**list_mode_options(mode or "default", dynamic=True), **NO_SIZE_GUARDS}}


def _known(config: Any, key: str) -> bool:
    """Whether an inductor config has a (dotted) option: an older torch may lack one."""
    head, _, rest = key.partition(".")
    return hasattr(getattr(config, head, None), rest) if rest else hasattr(config, key)


def decoder_layers(model: Any) -> list[Any]:
    """The repeated blocks of a (PEFT-wrapped) causal LM: the longest ModuleList of one block class.

    Prefers the classes the model names in `_no_split_modules` (its decoder layer), so a vision tower's
    blocks or a list of LoRA dropouts are never picked instead of the decoder.
    """
    from torch import nn

    no_split: set[str] = set()
    for module in model.modules():
        no_split.update(getattr(module, "_no_split_modules", None) or ())
    best: list[Any] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(m).__name__ for m in module}
        if len(kinds) != 1 or (no_split and not kinds & no_split):
            continue
        if len(module) > len(best):
            best = list(module)
    return best


def compile_decoder_layers(model: Any, *, mode: str | None = None, backend: str = "inductor") -> int:
    """Compile the decoder layers in place; returns how many. Raises when no layer stack is found."""
    from tunesmith.errors import TunesmithError

    layers = decoder_layers(model)
    if not layers:
        raise TunesmithError(
            f"torch_compile: found no stack of decoder layers in {type(model).__name__} to compile. "
            "Fix: set torch_compile: false"
        )
    # With frozen input embeddings (LoRA, freeze) the first layer's input needs no gradient, unlike every
    # other layer's: compiled, it would need a graph of its own, forward and backward (about a third of the
    # compile time on an H200), for 1/num_layers of the gain. It stays eager.
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    frozen_input = embeddings is not None and not any(p.requires_grad for p in embeddings.parameters())
    chosen = layers[1:] if frozen_input and len(layers) > 1 else layers
    for layer in chosen:
        layer.compile(backend=backend, dynamic=True, **compile_kwargs(mode, backend))
    log.info(
        "torch_compile: %d of %d x %s compiled in place (backend %s, mode %s)%s; the first step compiles",
        len(chosen), len(layers), type(layers[0]).__name__, backend, mode or "default",
        ", the first stays eager (its input needs no gradient)" if len(chosen) < len(layers) else "",
    )  # fmt: skip
    return len(chosen)
