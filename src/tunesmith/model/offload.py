"""`offload_activations`: each decoder layer's checkpointed input waits for backward in pinned CPU memory.

With gradient checkpointing, what a step keeps from forward to backward is mostly each decoder layer's input,
[tokens x hidden] per layer (0.7 GiB at 16k tokens for Qwen2.5-0.5B's 24 layers in bf16). PyTorch's
non-reentrant checkpoint stores those inputs as saved tensors (`_CheckpointFrame.save_inputs`) before it
pushes its own hooks, so saved_tensors_hooks active around the checkpoint see exactly them, and the
recomputation in backward reads them through the unpack hook. transformers' GradientCheckpointingLayer calls
its `_gradient_checkpointing_func` for the checkpoint (every 5.x release; what it checkpoints differs: 5.17
the module's `__call__`, 5.24 its `forward`), so the hooks are opened by a wrapper of that function and
surround the checkpoint and nothing else: the loss head (whose fused cross-entropy saves a [vocab x hidden]
gradient) and the recomputation stay on the GPU. (Checked on CPU with torch 2.13 and transformers 5.17 and
5.24: one tensor per layer, the same loss and gradients bit for bit; reentrant checkpointing would be seen
the same way, through its CheckpointFunction's save_for_backward.)

`ActivationOffload` holds the rules (what moves, when a GPU copy may be freed, what to prefetch);
`CudaOps` issues the copies, on a side stream per device, as torchtune's OffloadActivations does:
forward: the side stream waits for the compute stream, copies the tensor into pinned memory without
blocking, and records an event; the GPU tensor is kept until the compute stream has waited for that event
(at the next pack or the first unpack), so its memory is reused only after the copy, with no host sync.
backward: unpacking layer k's input copies it back (unless prefetched), starts the copy of layer k-1's
input, and makes the compute stream wait for layer k's; the last layer's input, still on the device when
backward starts with it, is used as it is. Pinned buffers come from PyTorch's caching host
allocator, so from the second step on they are reused, not allocated.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Protocol

import torch
from torch import nn

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")

MIN_BYTES = 2**20  # smaller saved tensors stay where they are: a copy would cost more than it frees


class DeviceOps(Protocol):
    """The device calls of offloading: `CudaOps`, or a fake in tests."""

    def handles(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives on a device this moves from (CPU tensors stay as they are)."""

    def to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``t`` to host memory after the work queued so far; (host tensor, event when done)."""

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Start copying ``host`` back to ``device``; (device tensor, event when done)."""

    def wait(self, event: Any, device: torch.device) -> None:
        """Make ``device``'s current stream wait for ``event`` (the host does not wait)."""


class CudaOps:
    """Copies on one side stream per CUDA device, into pinned memory and back."""

    def __init__(self) -> None:
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def handles(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device)
        return self._side[device]

    def to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        side = self._stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))  # t is written by work queued before
        with torch.cuda.stream(side):
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
        t.record_stream(side)  # the allocator reuses t's memory only after this copy, whoever frees t
        return host, side.record_event()

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        side = self._stream(device)
        out = torch.empty_like(host, device=device)  # allocated on the compute stream, which frees it
        side.wait_stream(torch.cuda.current_stream(device))  # its memory may be in use by queued work
        with torch.cuda.stream(side):
            out.copy_(host, non_blocking=True)
        out.record_stream(side)  # a prefetch dropped unused (backward raised) is not reused mid-copy
        return out, side.record_event()

    def wait(self, event: Any, device: torch.device) -> None:
        torch.cuda.current_stream(device).wait_event(event)


class _Offloaded:
    """A saved tensor in host memory, its copy back once started, and the tensor saved just before it."""

    def __init__(self, host: torch.Tensor, device: torch.device, before: weakref.ref | None) -> None:
        self.host, self.device, self.before = host, device, before
        self.back: tuple[torch.Tensor, Any] | None = None  # (device tensor, event) while on its way
        self.held: torch.Tensor | None = None  # the device tensor itself, until its copy out is waited for


class ActivationOffload:
    """saved_tensors_hooks' pack and unpack that move tensors of ``min_bytes`` or more through ``ops``."""

    def __init__(self, ops: DeviceOps, min_bytes: int = MIN_BYTES) -> None:
        self.ops, self.min_bytes = ops, min_bytes
        self._copying: list[tuple[_Offloaded, Any]] = []  # saved tensors whose copy out is not waited for
        self._last: weakref.ref | None = None  # the latest _Offloaded; weak, so a step's ones die with it

    def pack(self, t: torch.Tensor) -> Any:
        small = t.numel() * t.element_size() < self.min_bytes
        # weights, and leaves that require grad (LoRA's first layer input, made so by transformers'
        # enable_input_require_grads), are held by the model or the graph anyway: a copy would free nothing
        kept = isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad)
        if small or kept or not self.ops.handles(t):
            return t
        self._release_copied()
        host, event = self.ops.to_host(t)
        saved = _Offloaded(host, t.device, self._last)
        saved.held = t
        self._copying.append((saved, event))
        self._last = weakref.ref(saved)
        return saved

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        held, packed.held = packed.held, None
        self._copying = [(s, e) for s, e in self._copying if s is not packed]
        self._release_copied()
        if held is not None:
            # the last layer's input, still on the device when backward starts with it: no round trip (the
            # allocator keeps its memory until the copy out is done, `CudaOps.to_host`)
            t, event = held, None
        else:
            t, event = packed.back or self.ops.to_device(packed.host, packed.device)
        packed.back = None  # kept on the GPU only as long as backward uses it
        before = packed.before() if packed.before is not None else None
        if before is not None and before.back is None:  # backward needs it next: prefetch
            before.back = self.ops.to_device(before.host, before.device)
        if event is not None:
            self.ops.wait(event, packed.device)
        return t

    def _release_copied(self) -> None:
        """The compute stream waits for the copies started so far; then their device tensors may go."""
        for saved, event in self._copying:
            self.ops.wait(event, saved.device)
            saved.held = None
        self._copying.clear()


class _OffloadedCheckpoint:
    """A decoder layer's checkpoint function with the offload hooks open around the call, and only it.

    transformers' GradientCheckpointingLayer checkpoints through its ``_gradient_checkpointing_func`` (set by
    ``gradient_checkpointing_enable``) in every 5.x release, whether the checkpointed callable is ``forward``
    (5.24) or the module's ``__call__`` with its hooks (5.17): wrapping that function surrounds exactly the
    checkpoint, which saves the layer's input, and nothing the layer saves inside it.
    """

    def __init__(self, checkpoint: Any, offload: ActivationOffload) -> None:
        self.checkpoint = checkpoint
        self.hooks = torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.hooks:
            return self.checkpoint(*args, **kwargs)


def offload_layer_inputs(layers: list[nn.Module], offload: ActivationOffload) -> None:
    """Route what each checkpointed decoder layer saves (its input) through ``offload``.

    Call after gradient checkpointing is enabled: enabling it again sets a plain checkpoint function.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in layers:
        if not isinstance(layer, GradientCheckpointingLayer) or not layer.gradient_checkpointing:
            raise TunesmithError(
                f"offload_activations: decoder layer {type(layer).__name__} is not checkpointed by "
                "transformers' GradientCheckpointingLayer, so its saved tensors cannot be offloaded. "
                "Fix: remove offload_activations (or turn gradient checkpointing on)"
            )
    for layer in layers:
        if not isinstance(layer._gradient_checkpointing_func, _OffloadedCheckpoint):
            layer._gradient_checkpointing_func = _OffloadedCheckpoint(
                layer._gradient_checkpointing_func, offload
            )
    if torch.cuda.is_available():
        log.info("offload_activations: gradient checkpointing on; the inputs of %d decoder layers wait for "
                 "backward in pinned CPU memory (those of %d MiB or more, from a GPU)", len(layers),
                 offload.min_bytes // 2**20)  # fmt: skip
    else:
        log.warning("offload_activations: gradient checkpointing on; no CUDA device, so nothing is offloaded "
                    "(the layer inputs are already in CPU memory)")  # fmt: skip
