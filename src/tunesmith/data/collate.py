"""Batches of tokenized rows -> tensors. The one module of `tunesmith.data` that imports torch.

Two layouts:
- padded: rows padded to the longest in the batch (to a multiple of 8 on GPU), with an attention mask;
- packed: rows carry `position_ids` that restart at 0 for every document and NO attention mask, so the
  model's mask builder makes attention block-diagonal (transformers detects packed sequences from
  position ids; flash-attention derives cu_seqlens from them), and no token attends across documents.

With ``boundaries`` (flash_attn: varlen) a batch is one row [1, total]: its rows, packed or not, back to
back with no padding between them (padding-free batches), carrying the document boundaries
(`BOUNDARY_KEYS`), so the attention needs neither a mask nor a device sync. One row whatever the batch
also means compiled layers never see a new batch size: a last, smaller batch of an epoch with one packed
row would otherwise specialise them on size 1 and recompile them mid-run (6.3 s on an H200, Llama-3.2-1B).

Every batch also carries ``use_cache=False``: transformers looks for packed sequences only when the model
has no KV cache, and a model whose config says ``use_cache: true`` (most do) makes one in a training
forward too (without gradient checkpointing), which silently gives packed rows one causal mask across
documents. tests/training/test_invariants.py proves packed == unpacked losses.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
# Flat indices of the positions whose next-token label is trained, computed on the CPU for the fused loss
# (training.fused_ce), which otherwise finds them on the device (a sync per micro-batch).
LOSS_ROWS = "loss_rows"
# With static shapes: a weight per loss row (float32, 1 for the batch's own rows, 0 for the padding rows)
LOSS_ROW_WEIGHTS = "loss_row_weights"
# transformers' FlashAttentionKwargs names: they flow from model(**batch) to every attention call.
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Static shapes: token and document counts on a grid of this many steps per doubling, from these floors, so
# the batches of a run fall in few shapes (each one CUDA graph, `training.step_graphs`) with padding under 1/4
# of the tokens. The loss rows are padded to a fixed share of the batch's width (the most any batch of the
# data needs, `trained_fraction`), not to a grid of their own: a batch's shape is then its width alone. On the
# bench's default LoRA data (8 rows of 60-2,048 tokens a step, a trained share of 0.92, which rounds up to the
# width) that is 11 shapes in 60 steps, 5 of them first seen after step 10, against 28 and 21 with 8 steps per
# doubling and the loss rows on their own grid (simulated from the data's lengths; 21 was also what the GPU
# run captured), for 9.5% padded tokens (5.0% before).
STATIC_STEPS_PER_OCTAVE = 4
STATIC_FLOORS = {"tokens": 256, "documents": 16, "rows": 64}  # 16: up to 15 rows have one count


def grid_size(n: int, floor: int, steps_per_octave: int = STATIC_STEPS_PER_OCTAVE) -> int:
    """``n`` rounded up to a grid of ``steps_per_octave`` sizes per doubling, at least ``floor`` (a power of
    two): 1399 -> 1536 (steps of 256 between 1024 and 2048), 2048 -> 2048, 2049 -> 2560."""
    if n <= floor:
        return floor
    step = max(1, (1 << ((n - 1).bit_length() - 1)) // steps_per_octave)
    return -(-n // step) * step


def static_width(total: int, multiple: int = 1) -> int:
    """The width of a static-shape varlen batch of ``total`` tokens: the grid size, to a multiple."""
    return -(-grid_size(total, STATIC_FLOORS["tokens"]) // multiple) * multiple


def _drawn_batches(
    lengths: np.ndarray, rows: int, multiple: int, draws: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices [draws, rows], static widths [draws]) of ``draws`` batches of ``rows`` rows drawn at
    random (a fixed seed: no training randomness is used)."""
    picks = np.random.default_rng(0).integers(0, len(lengths), size=(draws, rows))
    totals = np.asarray(lengths, dtype=np.int64)[picks].sum(axis=1)
    return picks, np.array([static_width(int(t), multiple) for t in totals])


def likely_widths(
    lengths: np.ndarray,
    rows: int,
    multiple: int = 1,
    draws: int = 4096,
    limit: int = 48,
    batches: int | None = None,
) -> list[int]:
    """The static widths that batches of ``rows`` rows drawn at random from rows of ``lengths`` tokens
    take, as ``draws`` draws see them: a width that fewer than about 1 batch in ``draws`` has may be
    missing. With ``batches`` (the run's micro-batches), only the widths expected at least once in the run.
    At most ``limit``, the most frequent, ascending."""
    if len(lengths) == 0 or rows < 1:
        return []
    widths, counts = np.unique(_drawn_batches(lengths, rows, multiple, draws)[1], return_counts=True)
    if batches is not None:
        often = counts * batches >= draws  # expected count over the run >= 1
        widths, counts = widths[often], counts[often]
    keep = np.argsort(-counts, kind="stable")[:limit]
    return sorted(int(w) for w in widths[keep])


def trained_fraction(
    lengths: np.ndarray,
    trained_of: Callable[[np.ndarray], np.ndarray],
    rows: int,
    multiple: int = 1,
    draws: int = 4096,
) -> float:
    """The largest share of a static batch's width that its trained tokens take, over ``draws`` batches of
    ``rows`` rows drawn at random (``trained_of(indices)``: those rows' trained tokens, asked only for the
    drawn rows): the loss rows of a static batch are padded to this share of its width (`static_loss_size`),
    not to the whole width, so data with long prompts and short answers does not send every prompt token
    through the LM head. 1.0 without rows."""
    if len(lengths) == 0 or rows < 1:
        return 1.0
    picks, widths = _drawn_batches(lengths, rows, multiple, draws)
    drawn, where = np.unique(picks, return_inverse=True)
    targets = np.asarray(trained_of(drawn), dtype=np.int64)[where.reshape(picks.shape)].sum(axis=1)
    return float(min(1.0, (targets / widths).max()))


def static_loss_size(width: int, fraction: float) -> int:
    """The loss rows of a static batch of ``width`` tokens: ``fraction`` of the width on the grid, at most
    the width (a batch with more trained tokens takes the width: correct, one more shape)."""
    return min(width, grid_size(math.ceil(width * fraction), STATIC_FLOORS["rows"]))


def width_rows(width: int, rows: int, token: int, weights: bool = False) -> list[dict[str, Any]]:
    """``rows`` unpacked rows of ``token`` that a static-shape collator makes a batch of ``width`` tokens (a
    grid size) with a padding document, as most real batches have, and one target: its loss rows are then
    padded to the size every batch of that width within the data's trained share gets (`static_loss_size`),
    so the batch has the shape of the real ones. For capturing a CUDA graph ahead (`training.step_graphs`);
    its values are never trained on."""
    total = width - 1  # rounds up to ``width`` (a grid size and a multiple), leaving one padding token
    rows = max(1, min(rows, total // 2))
    out: list[dict[str, Any]] = []
    for i in range(rows):
        n = total // rows + (i < total % rows)
        labels = [IGNORE_INDEX] * n
        if i == 0:
            labels[-1] = token  # the one target (a row's first label is never one)
        row: dict[str, Any] = {"input_ids": [token] * n, "labels": labels}
        if weights:
            row["weights"] = [1.0] * n
        out.append(row)
    return out


def _pad(
    rows: Sequence[Sequence[int | float]], value: int | float, length: int, dtype: torch.dtype
) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def document_boundaries(
    position_ids: Sequence[Sequence[int]] | None, lengths: Sequence[int], width: int
) -> list[int]:
    """Cumulative document starts over ``len(lengths)`` rows of ``width`` tokens, flattened, ending at the total.

    A document starts at every row's start, wherever a packed row's position ids do not continue (+1),
    and at a padded row's first padding token (``lengths[i] < width``).
    """
    starts: list[int] = []
    for i, n in enumerate(lengths):
        base = i * width
        starts.append(base)
        if position_ids is not None:
            p = position_ids[i]
            starts.extend(base + j for j in range(1, n) if p[j] != p[j - 1] + 1)
        if n < width:
            starts.append(base + n)
    return [*starts, len(lengths) * width]


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The next-token target of every position, flattened over [batch x time] (IGNORE_INDEX at row ends)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def target_rows(shifted: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions of `shifted_labels`' output that have a target."""
    return (shifted != IGNORE_INDEX).nonzero().squeeze(1)


def loss_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (over [batch x time]) of the positions whose next token is a target."""
    return target_rows(shifted_labels(labels))


def static_loss_rows(rows: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """`LOSS_ROWS` padded to ``size`` rows (`static_loss_size`) with copies of the first (a position with a
    real target, so the loss takes them as they are) and `LOSS_ROW_WEIGHTS` that zero the copies. No rows:
    none added."""
    n = rows.numel()
    if n == 0:
        return {}
    weights = torch.zeros(size, dtype=torch.float32)
    weights[:n] = 1.0
    return {LOSS_ROWS: torch.cat([rows, rows[:1].expand(size - n)]), LOSS_ROW_WEIGHTS: weights}


def boundary_kwargs(cu: list[int], longest: int) -> dict[str, Any]:
    """The batch keys that carry the boundaries: int32 cumulative lengths and ``longest``, an upper bound of
    the longest document (flash accepts any; a rounded one gives compiled layers fewer values to see)."""
    t = torch.tensor(cu, dtype=torch.int32)
    return {"cu_seq_lens_q": t, "cu_seq_lens_k": t, "max_length_q": longest, "max_length_k": longest}


@dataclass(frozen=True)
class CausalLMCollator:
    """Collate sft/pt rows (input_ids, labels, optional weights, optional position_ids for packed rows)."""

    pad_token_id: int
    pad_to_multiple_of: int = 1
    # flash_attn: varlen: one padding-free row with its document boundaries (BOUNDARY_KEYS), model/varlen.py
    boundaries: bool = False
    # with boundaries: every size on a grid (`grid_size`), so a CUDA graph per shape can replay the step
    static_shapes: bool = False
    # static shapes: the loss rows are padded to this share of the width (`trained_fraction` of the data)
    loss_rows_fraction: float = 1.0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self.boundaries:
            return self._flattened(features)
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
        batch[LOSS_ROWS] = loss_rows(batch["labels"])
        if any(f.get("weights") is not None for f in features):
            # a row without weights (None: all 1.0) next to weighted rows
            w = [
                f["weights"] if f.get("weights") is not None else [1.0] * len(f["input_ids"])
                for f in features
            ]
            batch["loss_weights"] = _pad(w, 0.0, length, torch.float32)
        return batch

    def _flattened(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows as one row of their documents back to back, with no padding between them: [1, total]
        (padded at the end to a multiple), position ids restarting per document, and the boundaries.
        Attention stays within each document (flash_attn: varlen). Every row's first label is masked,
        because the token before it now belongs to another row; in the padded batch that label was never a
        target (packing masks every document's first label the same way, `packing.packed_rows`). So the
        losses are those of the padded batch, and no compute goes to padding.

        With ``static_shapes`` the row is padded to `grid_size` tokens (one more document, labels -100), the
        boundaries get empty documents up to `grid_size` documents with the length as the longest, and the
        loss rows are padded with zero-weight copies (`static_loss_rows`) to ``loss_rows_fraction`` of the
        length (`static_loss_size`; the length for a batch with more targets): the same losses in one of
        few shapes, in effect one per length, so a CUDA graph captured for a shape replays its later batches
        (`training.step_graphs`)."""
        packed = "position_ids" in features[0]
        lens = [len(f["input_ids"]) for f in features]
        total = sum(lens)
        m = self.pad_to_multiple_of
        length = -(-total // m) * m
        if self.static_shapes:
            length = static_width(total, m)
        pad = length - total
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        starts: list[int] = []  # of every document, in the one row
        for f, n in zip(features, lens):
            if packed:
                starts.extend(len(ids) + j for j in document_boundaries([f["position_ids"]], [n], n)[:-1])
                pos.extend(f["position_ids"])
            else:
                starts.append(len(ids))
                pos.extend(range(n))
            ids.extend(f["input_ids"])
            labels.append(IGNORE_INDEX)
            labels.extend(f["labels"][1:])
        ids.extend([self.pad_token_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        pos.extend(range(pad))
        cu = [*starts, total] + ([length] if pad else [])
        longest = max(b - a for a, b in itertools.pairwise(cu))
        # the longest document, rounded up: fewer distinct values for compiled layers to see
        longest = min(length, -(-longest // 256) * 256)
        if self.static_shapes:  # empty documents at the end; flash's grid covers the length, not the longest
            docs = grid_size(len(cu) - 1, STATIC_FLOORS["documents"])
            cu, longest = cu + [length] * (docs + 1 - len(cu)), length
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "use_cache": False,
            **boundary_kwargs(cu, longest),
        }
        batch[LOSS_ROWS] = loss_rows(batch["labels"])
        if self.static_shapes:
            size = static_loss_size(length, self.loss_rows_fraction)
            size = size if batch[LOSS_ROWS].numel() <= size else length
            batch.update(static_loss_rows(batch[LOSS_ROWS], size))
        if any(f.get("weights") is not None for f in features):
            w: list[float] = []
            for f, n in zip(features, lens):
                row = f["weights"] if f.get("weights") is not None else [1.0] * n
                w.append(0.0)
                w.extend(row[1:])
            batch["loss_weights"] = torch.tensor([w + [0.0] * pad], dtype=torch.float32)
        return batch
