"""export_quantization_bit: the checked 16-bit export reloaded through bitsandbytes (NF4 or int8) and saved.

bitsandbytes 0.50.2 does both 4 and 8 bits on CPU as well as CUDA (verified: quantize, save, reload and
generate with the tiny model on a CPU-only machine); a build that cannot fails at load, and the error says
what to do.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.export.checks import diff_stats, probe_logits
from tunesmith.export.merge import save_weights
from tunesmith.export.probes import Probe
from tunesmith.model.loader import bnb_config

log = logging.getLogger("tunesmith")
BNB_FIX = "install tunesmith[bnb] (bitsandbytes): pip install 'tunesmith[bnb]'"


@dataclass
class QuantDrift:
    """How far the quantized model's logits moved from the 16-bit merge (information, not a failure)."""

    bits: int
    top1_agreement: float  # share of positions whose argmax token is unchanged
    max_abs_diff: float


def require_bitsandbytes(bits: int) -> None:
    """Fail before any work when bitsandbytes is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunesmithError(
            f"export_quantization_bit: {bits} needs bitsandbytes, which is not installed. Fix: {BNB_FIX}"
        )


def quantize_folder(
    folder: str | Path, bits: int, dtype: torch.dtype, *, device: str, max_shard_size: int | str
) -> tuple[Any, list[str]]:
    """Load ``folder`` quantized and replace its weights with the quantized ones; the model and weight files."""
    from transformers import AutoModelForCausalLM

    require_bitsandbytes(bits)
    folder = Path(folder)
    device_map: Any = "auto" if device == "auto" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, quantization_config=bnb_config(bits, dtype), device_map=device_map
        )
    except (RuntimeError, ValueError, ImportError, NotImplementedError) as e:
        where = "on the CPU" if device == "cpu" else "with device_map auto"
        raise TunesmithError(
            f"export_quantization_bit: {bits}: bitsandbytes could not quantize {where}: {e}. The merged 16-bit "
            f"weights in {folder} passed the logits check. Fix: bitsandbytes 0.50 quantizes on CPU (pip install -U "
            "bitsandbytes); else use a CUDA GPU with export_device: auto"
        ) from e
    model.eval()
    # Saved beside, then swapped in: the 16-bit files may still be memory-mapped by the loaded model, and
    # overwriting a mapped file in place corrupts it; unlinking it does not.
    staging = folder / ".quantized"
    shutil.rmtree(staging, ignore_errors=True)
    weights = save_weights(model, staging, max_shard_size=max_shard_size)
    for p in folder.iterdir():
        if p.is_file() and (p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json"):
            p.unlink()
    for name in (*weights, "config.json"):
        (staging / name).replace(folder / name)
    shutil.rmtree(staging)
    log.info("export: weights replaced by the %d-bit bitsandbytes model (%s)", bits, ", ".join(weights))
    return model, weights


def drift(
    bits: int, merged: Sequence[torch.Tensor], quantized_model: Any, probes: Sequence[Probe]
) -> tuple[QuantDrift, list[torch.Tensor]]:
    """Top-1 agreement and max |diff| of the quantized model's logits against the 16-bit merge's."""
    got = probe_logits(quantized_model, probes)
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(merged, got))
    total = sum(a.shape[0] for a in merged)
    return QuantDrift(bits, same / max(total, 1), diff_stats(merged, got)[0]), got
