"""Load the base in its own dtype, put LoRA adapters on it (unmerged, for the reference), merge, save shards.

The base is always the 16-bit (or fp32) checkpoint, never a quantized load: a QLoRA adapter is merged
into the original weights, because merging into dequantized 4-bit weights bakes the quantization error
into the export.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")


def base_dtype(path: str | Path, *, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the base's config names (what ``dtype="auto"`` loads); fp32 when it names none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TunesmithError(
            f"model_name_or_path: cannot read the config of {str(path)!r}: {e}. Fix: give a folder with "
            "config.json (or a hub id in the local cache)"
        ) from e
    dtype = config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_base(
    path: str | Path, tokenizer: Any, *, device: str, trust_remote_code: bool = False
) -> tuple[Any, torch.dtype]:
    """The base model in its own dtype, unquantized, on ``device`` (cpu | auto); embeddings sized to the tokenizer."""
    from tunesmith.model.loader import load_model

    dtype = base_dtype(path, trust_remote_code=trust_remote_code)
    loaded = load_model(
        path,
        dtype=dtype,
        attn="auto",
        gradient_checkpointing=False,
        trust_remote_code=trust_remote_code,
        quantization_bit=None,
        device_map="auto" if device == "auto" else None,
        tokenizer=tokenizer,
    )
    loaded.model.eval()
    return loaded.model, dtype


def attach_adapters(model: Any, adapters: Sequence[str]) -> Any:
    """A PeftModel with every adapter loaded and active at once (their deltas add, as merging in order does)."""
    from peft import PeftModel

    names = [f"adapter_{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    if len(names) > 1:
        # PeftModel.set_adapter takes one name; the LoRA model under it activates several at once.
        peft_model.base_model.set_adapter(names)
    peft_model.eval()
    return peft_model


def adapter_summary(peft_model: Any) -> list[dict[str, Any]]:
    """Per adapter: rank, alpha, scaling kind, target modules (for the report and the model card)."""
    out = []
    for name, c in peft_model.peft_config.items():
        targets = c.target_modules
        out.append(
            {
                "name": name,
                "r": c.r,
                "lora_alpha": c.lora_alpha,
                "use_rslora": c.use_rslora,
                "use_dora": c.use_dora,
                "target_modules": sorted(targets) if isinstance(targets, set | list) else targets,
                "modules_to_save": list(c.modules_to_save or []),
            }
        )
    return out


def merge_adapters(peft_model: Any) -> Any:
    """Merge every active adapter into the base weights (in the base's dtype) and drop the PEFT wrappers."""
    names = list(peft_model.peft_config)
    return peft_model.merge_and_unload(adapter_names=names)


def save_weights(model: Any, out_dir: str | Path, *, max_shard_size: int | str) -> list[str]:
    """Write config + safetensors shards of at most ``max_shard_size`` (bytes or "5GB"); the weight file names."""
    out = Path(out_dir)
    before = {p.name for p in out.iterdir()} if out.exists() else set()
    model.save_pretrained(out, max_shard_size=max_shard_size)
    written = sorted(p.name for p in out.iterdir() if p.name not in before or _is_weight(p.name))
    return [n for n in written if _is_weight(n)]


def _is_weight(name: str) -> bool:
    return name.endswith(".safetensors") or name == "model.safetensors.index.json"
