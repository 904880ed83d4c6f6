"""LoRA inputs stay in the compute dtype during a mixed-precision training step.

PEFT casts each LoRA layer's input to the adapter's dtype (``_cast_input_dtype``): with tunesmith's fp32
adapters on a bf16 model, every LoRA layer makes an fp32 copy of its input, and autocast then makes a
bf16 copy of that for the matmul, which backward may keep. Under autocast that round trip (bf16 -> fp32
-> bf16) is exact, so it changes no number; it costs two elementwise copies per LoRA layer per forward
(twice with gradient checkpointing) and saved activations (tests/training/test_lora_casting.py: same
loss and gradients, fewer saved bytes). Turning PEFT's documented switch (``cast_input_dtype_enabled``)
off while a training step runs under autocast lets the adapter read the bf16 input itself. Outside the
step (evaluation, generation) PEFT casts as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn


def casting_layers(model: nn.Module) -> list[Any]:
    """PEFT tuner layers that cast their input to their adapter's dtype (none in a model without PEFT)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [
        m for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled")
    ]


def layers_to_uncast(model: nn.Module, *, autocast: bool, engine: bool) -> list[Any]:
    """The LoRA layers whose input casting a training step turns off: those of a model trained under
    autocast (bf16/fp16 mixed precision). DeepSpeed and FSDP (``engine``) cast the model themselves."""
    return casting_layers(model) if autocast and not engine else []


@contextmanager
def inputs_uncast(layers: Sequence[Any]) -> Iterator[None]:
    """Within the block, ``layers`` pass their input on in its own dtype; their settings come back after."""
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.cast_input_dtype_enabled = was
