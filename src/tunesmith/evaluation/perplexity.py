"""Perplexity of a model on tokenized data: token-weighted mean NLL over the supervised tokens.

The data goes through the training pipeline, so the tokens are exactly what training would see: stage
``pt`` scores every token of plain-text documents (each document whole, a longer one cut into
cutoff_len pieces scored separately), stage ``sft`` scores the responses of conversations given
their prompts. Token ``t`` is supervised when ``labels[t] != -100`` (``t`` > 0); its NLL is taken from
the logits at ``t - 1``, as the training loss does.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

IGNORE_INDEX = -100
CHUNK_ROWS = 4096  # positions whose [rows x vocab] fp32 logits are upcast at once


@dataclass(frozen=True)
class NLL:
    """Summed negative log-likelihood (nats) over ``tokens`` supervised tokens of ``samples`` rows."""

    nll_sum: float
    tokens: int
    samples: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")


@torch.inference_mode()
def sequence_nll(
    model: Any,
    rows: Sequence[dict[str, Any]],
    lengths: Sequence[int],
    *,
    batch_size: int,
    pad_id: int,
    show_progress: bool = True,
) -> NLL:
    """Summed NLL of the supervised tokens of rows with ``input_ids`` and ``labels`` (longest first).

    ``rows`` is a list or a TokenDataset; ``lengths`` the rows' token counts (sorted on without reading them).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=not show_progress, file=sys.stderr):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = len(batch[0]["input_ids"])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[r, :n] = torch.tensor(row["input_ids"])
            labels[r, :n] = torch.tensor(row["labels"])
            mask[r, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        targets = labels[:, 1:].to(device)
        where = targets != IGNORE_INDEX
        picked, wanted = logits[:, :-1][where], targets[where]
        for s in range(0, len(wanted), CHUNK_ROWS):
            chunk = picked[s : s + CHUNK_ROWS].float()
            total += F.cross_entropy(chunk, wanted[s : s + CHUNK_ROWS], reduction="sum").double().cpu()
        tokens += int(where.sum())
    return NLL(float(total), tokens, len(rows))
