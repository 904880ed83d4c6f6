"""Which kernels PyTorch's scaled_dot_product_attention may use while tunesmith trains or generates.

cuDNN attention is left out. PyTorch picks it first on Hopper GPUs, and it builds an execution graph for
every new input shape. Unpacked batches and KV-cache decoding change shape at nearly every call. On an
H100 (torch 2.11, Qwen2.5-0.5B, LoRA, batch 8 of alpaca rows), cuDNN attention cost 4.0 ms of host time
per forward call and 5.4 ms per backward call. That was about half of each 0.65 s step
(bench/profile_step_gpu.py). Flash and memory-efficient attention launch in microseconds and compute
the same attention. The context is scoped (flags restored on exit) and harmless on CPU, where these
flags play no part.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def sdpa_kernels() -> AbstractContextManager[None]:
    """Allow flash, memory-efficient and math SDPA kernels (not cuDNN) inside the ``with`` block."""
    return sdpa_kernel(list(SDPA_BACKENDS))
