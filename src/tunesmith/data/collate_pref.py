"""Preference batches -> tensors (rm, dpo, kto), and the dataset views they need. [torch]

- `PairwiseCollator`: rows of ``chosen_*``/``rejected_*`` columns -> one padded batch of 2B sequences,
  the B chosen first, then the B rejected (one forward pass serves both sides).
- `KTOPairs`: adds each row's KL pair (its prompt + the next row's completion; fixed per row, so reference
  log-probs of it can be precomputed), as in the KTO paper and TRL.
- `KTOCollator`: KTO rows (+ KL pairs) -> padded tensors.
- `WithColumns`: a dataset view with extra per-row values (precomputed reference log-probs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tunesmith.data.collate import IGNORE_INDEX, _pad

# per-row float columns the collators pass through as 1-D tensors when present
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")


def _padded(
    ids: list[Sequence[int]], labels: list[Sequence[int]], pad_id: int, multiple: int
) -> dict[str, torch.Tensor]:
    length = -(-max(len(r) for r in ids) // multiple) * multiple
    return {
        "input_ids": _pad(ids, pad_id, length, torch.long),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0, length, torch.long),
        "labels": _pad(labels, IGNORE_INDEX, length, torch.long),
    }


def _ref_columns(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor([f[k] for f in features], dtype=torch.float32)
        for k in REF_COLUMNS
        if k in features[0]
    }


@dataclass(frozen=True)
class PairwiseCollator:
    """chosen/rejected rows -> input_ids, attention_mask, labels of shape (2B, T): chosen rows first."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        sides = ("chosen", "rejected")
        ids = [f[f"{s}_input_ids"] for s in sides for f in features]
        labels = [f[f"{s}_labels"] for s in sides for f in features]
        batch: dict[str, Any] = _padded(ids, labels, self.pad_token_id, self.pad_to_multiple_of)
        batch.update(_ref_columns(features))
        batch["use_cache"] = False
        return batch


def first_label(labels: Sequence[int]) -> int:
    """Index of the first labelled token: where the completion starts (preference rows label only it)."""
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return i
    return len(labels)


class KTOPairs:
    """A KTO dataset view adding ``kl_input_ids``/``kl_labels``: row i's prompt + row i+1's completion."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = dict(self.base[i])
        other = self.base[(i + 1) % len(self.base)]
        p = first_label(row["labels"])
        c = first_label(other["labels"])
        row["kl_input_ids"] = list(row["input_ids"][:p]) + list(other["input_ids"][c:])
        row["kl_labels"] = [IGNORE_INDEX] * p + list(other["labels"][c:])
        return row

    def supervised_tokens(self) -> int:
        return self.base.supervised_tokens()


@dataclass(frozen=True)
class KTOCollator:
    """KTO rows -> input_ids/attention_mask/labels, kto_tag (bool), kl_input_ids/kl_attention_mask/kl_labels."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        m, pad = self.pad_to_multiple_of, self.pad_token_id
        batch: dict[str, Any] = _padded(
            [f["input_ids"] for f in features], [f["labels"] for f in features], pad, m
        )
        kl = _padded([f["kl_input_ids"] for f in features], [f["kl_labels"] for f in features], pad, m)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["kto_tag"] = torch.tensor([bool(f["kto_tag"]) for f in features], dtype=torch.bool)
        batch.update(_ref_columns(features))
        batch["use_cache"] = False
        return batch


class WithColumns:
    """A dataset view whose rows also carry per-row values of `columns` (arrays of len(base))."""

    def __init__(self, base: Any, columns: Mapping[str, np.ndarray]) -> None:
        for name, values in columns.items():
            if len(values) != len(base):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(base)} rows")
        self.base = base
        self.columns = dict(columns)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = dict(self.base[i])
        row.update({k: float(v[i]) for k, v in self.columns.items()})
        return row

    def supervised_tokens(self) -> int:
        return self.base.supervised_tokens()
