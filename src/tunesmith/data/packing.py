"""Bin packing of tokenized examples into cutoff_len rows that keep every document's boundaries.

A packed row carries ``position_ids`` restarting at 0 for every document and ``seq_lens`` (the
document lengths, summing to the row's length), from which the collator derives ``cu_seqlens`` for
flash-attention varlen or a block-diagonal mask, so attention never crosses documents.

Labels stay per document. Labels are unshifted (``labels[i]`` is the target of position i; the model
shifts them), so in a packed row the last token of document A would be trained to predict the first
token of document B. The first label of every document is therefore set to IGNORE_INDEX: in an
unpacked row that label is never a target anyway (nothing precedes it), so packing changes no loss.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from typing import Any

IGNORE_INDEX = -100


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of lengths grouped into bins of total <= capacity.

    Deterministic: documents are placed longest first (ties by index) into the fullest bin that still
    fits them; each bin lists its indices in ascending order; bins are ordered by creation.
    Example: pack([5, 3, 4, 2], 8) == [[0, 1], [2, 3]].
    """
    if capacity <= 0:
        raise ValueError(f"pack: capacity must be positive, got {capacity}")
    bad = [(i, n) for i, n in enumerate(lengths) if not 0 < n <= capacity]
    if bad:
        i, n = bad[0]
        raise ValueError(
            f"pack: document {i} has length {n}; every length must be in 1..{capacity} "
            f"(truncate to cutoff_len before packing; {len(bad)} such document(s))"
        )
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin) sorted: the best fit is a bisect away
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            remaining, b = capacity - n, len(bins) - 1
        else:
            remaining, b = free.pop(k)
            bins[b].append(i)
            remaining -= n
        if remaining > 0:
            insort(free, (remaining, b))
    return [sorted(b) for b in bins]


def packed_rows(
    examples: Mapping[str, Sequence[Sequence[Any]]], bins: list[list[int]]
) -> dict[str, list[Any]]:
    """Concatenate the examples of each bin: input_ids, labels (+ weights when present), position_ids,
    seq_lens. The first label (and weight) of every document is masked; see the module docstring."""
    ids, labels = examples["input_ids"], examples["labels"]
    weights = examples.get("weights")
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    if weights is not None:
        out["weights"] = []
    for b in bins:
        row_ids: list[int] = []
        row_labels: list[int] = []
        row_pos: list[int] = []
        row_w: list[float] = []
        for i in b:
            n = len(ids[i])
            row_ids.extend(ids[i])
            row_labels.append(IGNORE_INDEX)
            row_labels.extend(labels[i][1:])
            row_pos.extend(range(n))
            if weights is not None:
                row_w.append(0.0)
                row_w.extend(weights[i][1:])
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["position_ids"].append(row_pos)
        out["seq_lens"].append([len(ids[i]) for i in b])
        if weights is not None:
            out["weights"].append(row_w)
    return out
