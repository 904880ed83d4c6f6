"""Batches of tokenized rows -> tensors. The one module of `tunesmith.data` that imports torch.

Two layouts:
- padded: rows padded to the longest in the batch (to a multiple of 8 on GPU), with an attention mask;
- packed: rows carry `position_ids` that restart at 0 for every document and NO attention mask, so the
  model's mask builder makes attention block-diagonal (transformers detects packed sequences from
  position ids; flash-attention derives cu_seqlens from them), and no token attends across documents.

Every batch also carries ``use_cache=False``: transformers looks for packed sequences only when the model
has no KV cache, and a model whose config says ``use_cache: true`` (most do) makes one in a training
forward too (without gradient checkpointing), which silently gives packed rows one causal mask across
documents. tests/training/test_invariants.py proves packed == unpacked losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


def _pad(
    rows: Sequence[Sequence[int | float]], value: int | float, length: int, dtype: torch.dtype
) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


@dataclass(frozen=True)
class CausalLMCollator:
    """Collate sft/pt rows (input_ids, labels, optional weights, optional position_ids for packed rows)."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        length = -(-longest // m) * m
        batch: dict[str, Any] = {
            "input_ids": _pad([f["input_ids"] for f in features], self.pad_token_id, length, torch.long),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length, torch.long),
            "use_cache": False,  # see the module docstring
        }
        if "position_ids" in features[0]:
            # Padding continues as one more "document" (positions 0..k) fully masked from the loss.
            pos = []
            for f in features:
                p = list(f["position_ids"])
                pos.append(p + list(range(length - len(p))))
            batch["position_ids"] = torch.as_tensor(pos, dtype=torch.long)
        else:
            batch["attention_mask"] = _pad(
                [[1] * len(f["input_ids"]) for f in features], 0, length, torch.long
            )
        if any(f.get("weights") is not None for f in features):
            # a row without weights (None: all 1.0) next to weighted rows
            w = [
                f["weights"] if f.get("weights") is not None else [1.0] * len(f["input_ids"])
                for f in features
            ]
            batch["loss_weights"] = _pad(w, 0.0, length, torch.float32)
        return batch
