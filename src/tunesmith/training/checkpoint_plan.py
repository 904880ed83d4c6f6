"""Gradient checkpointing `auto`: off where the run fits on the GPU without it, else on.

Checkpointing trades one more forward per step for activation memory. Measured on GPUs, turning it off sped
up a LoRA step 1.30x (packed rows, H200: bench/results/profile_step_gpu-2026-11-28T0518Z-compile-h200.json,
0.480 -> 0.370 s/step) and 1.99x (unpacked rows, H100: profile_step_gpu-2026-11-28T0025Z-h100.json,
0.648 -> 0.325 s/step), at 26.7 and 10.6 GiB peak instead of about 3 GiB. So with
`disable_gradient_checkpointing` unset, a pt or sft run on one GPU (or DDP) measures what its activations
cost and turns checkpointing off when the whole step fits in half the card:

1. ``activation_bytes_per_token``: the model's forward, in training mode and its training precision, on
   128, 256 and 512 tokens of one row, counting the bytes of the distinct storages autograd saves for
   backward (``saved_tensors_hooks``). The slope between the last two is the bytes a token costs. Growth
   faster than linear (eager attention keeps a T x T matrix a layer) gives no slope: checkpointing stays on.
2. ``plan``: the bytes of the weights and buffers + gradients and AdamW state of the trained weights + the
   fused loss's chunk + slope x tokens per micro-batch (batch x cutoff_len, an upper bound) x 1.15 + 1 GiB, against
   ``SHARE`` of the card's memory. A pure function.

QLoRA (chosen to save memory), DeepSpeed and FSDP (which shard and account memory their own way), other
stages, CPU, and an explicit ``disable_gradient_checkpointing`` keep the fixed rule: on with a GPU, off on
CPU, or what the key says. The decision and its numbers are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("tunesmith.train")

SHARE = 0.5  # checkpointing goes off only if the estimate is at most this share of the GPU's memory
MARGIN = 1.15  # on the activations: a layer's gradients and kernel workspaces live beside them in backward
GIB = 2**30
HEADROOM = GIB  # CUDA context, allocator rounding, the optimizer step's temporaries
PROBE_TOKENS = (128, 256, 512)


@dataclass(frozen=True)
class CheckpointPlan:
    on: bool
    reason: str
    bytes_per_token: float | None = None
    estimate_bytes: float | None = None
    device_bytes: int | None = None


def plan(
    *, bytes_per_token: float | None, tokens: int, fixed_bytes: float, device_bytes: int
) -> CheckpointPlan:
    """Checkpointing off when ``fixed_bytes`` + activations of ``tokens`` fit in ``SHARE`` of the card."""
    if bytes_per_token is None:
        return CheckpointPlan(
            True,
            "activation memory grows faster than linearly with the sequence (eager attention?), so it is "
            "not extrapolated",
            device_bytes=device_bytes,
        )
    estimate = fixed_bytes + bytes_per_token * tokens * MARGIN + HEADROOM
    where = (
        f"about {estimate / GIB:.1f} GiB without it at {tokens:,} tokens per micro-batch "
        f"({bytes_per_token / 2**20:.2f} MiB a token), of the GPU's {device_bytes / GIB:.1f} GiB"
    )
    off = estimate <= SHARE * device_bytes
    reason = where if off else f"{where}: more than {SHARE:.0%} of it"
    return CheckpointPlan(not off, reason, bytes_per_token, estimate, device_bytes)


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (its result dropped)."""
    sizes: dict[tuple[Any, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def activation_bytes_per_token(
    model: Any,
    *,
    vocab_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    uncast: Callable[[], Any],
    tokens: tuple[int, ...] = PROBE_TOKENS,
) -> float | None:
    """Bytes autograd keeps per token of one micro-batch (see the module docstring), or None if superlinear.

    ``uncast``: a context manager factory that puts the model's LoRA layers as a training step runs them.
    """
    from tunesmith.data.collate import boundary_kwargs
    from tunesmith.model.attention import sdpa_kernels
    from tunesmith.model.varlen import ATTN_NAME

    was_training = model.training
    model.train()
    generator = torch.Generator().manual_seed(0)
    # varlen attends through its flash kernel only with the boundaries a training batch carries
    varlen = getattr(model.config, "_attn_implementation", None) == ATTN_NAME
    precision = torch.autocast(
        device.type, dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype)
    )

    def forward(n: int) -> Callable[[], Any]:
        kw: dict[str, Any] = {
            "input_ids": torch.randint(0, vocab_size, (1, n), generator=generator).to(device)
        }
        if varlen:
            kw |= {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in boundary_kwargs([0, n], n).items()
            }

        def run() -> None:
            # the kernels a training step may use (no cuDNN), as in finish_run
            with precision, uncast(), sdpa_kernels():
                try:
                    model(**kw, use_cache=False, logits_to_keep=1)
                except TypeError:  # custom modelling code without logits_to_keep: its logits are not saved
                    model(**kw, use_cache=False)

        return run

    try:
        with torch.enable_grad():
            measured = [saved_bytes(forward(n)) for n in tokens]
    finally:
        model.train(was_training)
    (t0, t1, t2), (b0, b1, b2) = tokens, measured
    first, last = (b1 - b0) / (t1 - t0), (b2 - b1) / (t2 - t1)
    if last > 1.1 * first:
        return None
    return max(last, 0.0)


def decides(*, disable: bool | None, kind: str, quantized: bool, sharded: bool, cuda: bool) -> bool:
    """Whether `auto` measures this run (see the module docstring); otherwise the fixed rule holds."""
    return disable is None and kind in ("pt", "sft") and not quantized and not sharded and cuda


def decide(
    model: Any,
    *,
    tokens: int,
    vocab_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    uncast: Callable[[], Any],
    device_bytes: int | None = None,
) -> CheckpointPlan:
    """Move ``model`` to ``device``, measure its activations and plan (``device_bytes``: the card's memory,
    read from the device when None). The loss head is taken as the fused loss's chunk."""
    from tunesmith.training.fused_ce import default_chunk_rows

    model.to(device)
    if device_bytes is None:
        device_bytes = torch.cuda.get_device_properties(device).total_memory
    per_token = activation_bytes_per_token(
        model, vocab_size=vocab_size, device=device, autocast_dtype=autocast_dtype, uncast=uncast
    )
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trained = sum(p.numel() * (p.element_size() + 8) for p in model.parameters() if p.requires_grad)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(out, "weight", None)
    trained_head = w is not None and w.requires_grad
    # bf16 + fp32 logits and the bf16 gradient of one chunk of the fused loss
    head = default_chunk_rows(vocab_size, trained_head) * vocab_size * 8
    if w is not None and w.dtype == torch.float32 and autocast_dtype is not None:
        head += w.numel() * 2  # fused_ce's bf16 copy of an fp32 head for its matmuls
    return plan(
        bytes_per_token=per_token,
        tokens=tokens,
        fixed_bytes=weights + trained + head,
        device_bytes=device_bytes,
    )
