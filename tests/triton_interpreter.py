"""Running a test module's Triton kernels in triton's interpreter, on CPU tensors.

TRITON_INTERPRET must be set before triton defines a kernel, and the interpreter patches ``triton.language``
for good once it has run, which would break a real compile later in the same process (the GPU tests). So a
test module's interpreted calls run in one subprocess: ``run_interpreted(out)``, a function of that module,
saves its results with torch.save, and `interpreted_results` loads them back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def interpreted_results(module: str, out: Path, function: str = "run_interpreted") -> dict[str, Any]:
    """``module.<function>(out)`` in a subprocess under TRITON_INTERPRET=1; its saved results."""
    code = f"from {module} import {function}; {function}({str(out)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=True)


def interpreter_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close's tolerance for interpreted kernel outputs against eager: the interpreter casts fp32 to
    bf16 by truncation (the GPU rounds to nearest), two ulps in bf16."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-6, "atol": 2**-6}
