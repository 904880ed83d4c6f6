"""Triton kernels built on first use, for the modules that carry one (the fused head's chunk math, the fused
SwiGLU and RoPE layers).

A kernel's source names ``tl`` (``triton.language``) as a global of its own module, which must not import
triton at import time (it is optional, and slow to import). `build` binds ``tl`` in that module's namespace,
then jits the kernels. Triton reads TRITON_INTERPRET when a kernel is defined, so that is when the interpreter
is chosen (tests run the kernels on CPU tensors that way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("tunesmith")


@dataclass(frozen=True)
class Built:
    fns: tuple[Any, ...]  # the jit functions, in the order asked
    interpreted: bool  # built under TRITON_INTERPRET: they run on CPU tensors too


def build(
    namespace: dict[str, Any], kernels: Sequence[tuple[Callable[..., Any], dict[str, Any]]], what: str
) -> Built | None:
    """jit each ``(function, jit options)`` of ``kernels`` after binding ``tl`` in ``namespace`` (the globals of
    the kernels' module). None without triton, or when triton cannot build them (logged, naming ``what``:
    the caller's eager math runs instead)."""
    try:
        import triton
        import triton.language
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return None
    namespace["tl"] = triton.language
    try:
        fns = tuple(triton.jit(fn, **options) for fn, options in kernels)
    except Exception as e:  # noqa: BLE001 - e.g. no source to read (inspect): the eager math instead
        logger.warning("%s: the Triton kernel cannot be built (%s: %s); the eager math runs",
                       what, type(e).__name__, e)  # fmt: skip
        return None
    return Built(fns, isinstance(fns[0], InterpretedFunction))
