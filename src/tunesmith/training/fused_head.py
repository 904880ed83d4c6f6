"""The fused loss applied to an HF model's own output head (`fused_ce` does the math).

The head's input is taken by a forward pre-hook that hands the head an empty sequence, so the model's own
forward (DDP and PEFT wrappers included) runs unchanged and skips the logits. A probe on a few tokens checks
once that this reproduces the model's logits (soft-capping and scaling included) before the fused loss is
trusted; otherwise the caller keeps the plain path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.collate import (
    BOUNDARY_KEYS,
    IGNORE_INDEX,
    LOSS_ROW_WEIGHTS,
    LOSS_ROWS,
    shifted_labels,
    target_rows,
)
from tunesmith.training.fused_ce import (
    LogitTransform,
    compute_dtype,
    default_chunk_rows,
    linear_cross_entropy,
    linear_token_logps,
)
from tunesmith.training.fused_ce_triton import kernel_fault

logger = logging.getLogger(__name__)

PROBE_TOKENS = 16
PROBE_TOLERANCE = 1e-2  # of the largest logit: bf16 rounding passes, a missed scale or cap does not


@contextmanager
def head_input(head: torch.nn.Module, skip_logits: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect what ``head`` is called with; with ``skip_logits`` it is handed an empty sequence instead."""
    seen: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:]) if skip_logits else None

    handle = head.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@dataclass(frozen=True)
class FusedHead:
    """A model's plain ``nn.Linear`` output head with its logit transform, ready for the fused loss."""

    head: torch.nn.Linear
    transform: LogitTransform
    chunk_rows: int
    mixed: torch.dtype | None = None  # the run's mixed precision, for an fp32 head: `compute_dtype`
    # each chunk's softmax compiled with this backend (`fused_ce_chunk`); None: eager
    compile_backend: str | None = None
    # the chunk math's Triton kernel where it runs (`fused_ce_triton`); False: it failed its check here
    kernel: bool = True

    def describe(self) -> str:
        """For the log: "head [151936, 896] float32, matmuls in bfloat16, <transform>, chunks of 220 rows"."""
        w = self.head.weight
        dtypes = [str(d).removeprefix("torch.") for d in (w.dtype, compute_dtype(w, self.mixed))]
        return (
            f"head {list(w.shape)} {dtypes[0]}, matmuls in {dtypes[1]}, {self.transform}, "
            f"chunks of {self.chunk_rows} rows"
            + (f", softmax compiled ({self.compile_backend})" if self.compile_backend else "")
            + ("" if self.kernel else ", softmax eager (its Triton kernel failed its check)")
        )

    def loss_sum(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        labels: torch.Tensor,
        token_weights: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        row_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int | torch.Tensor, Any]:
        """(sum of next-token losses, supervised tokens, model outputs with empty logits) of one batch.

        ``model`` may be the wrapped one (DDP, PEFT): its forward runs as is, the head sees no tokens.
        ``rows``: the batch's `loss_rows` from the collator (no device sync); found on the device if None.
        ``row_weights``: the collator's `loss_row_weights` (static shapes: 0 for its padding rows), one per
        row; then the token count is their sum, a tensor.
        """
        rows, hidden, targets, outputs = self._supervised(model, inputs, labels, rows)
        weights = None
        if token_weights is not None:  # a weight goes with its label, so it shifts with it
            weights = F.pad(token_weights[:, 1:], (0, 1)).reshape(-1).index_select(0, rows)
        if row_weights is not None:
            row_weights = row_weights.to(hidden.device, non_blocking=True)
            weights = row_weights if weights is None else weights * row_weights
        total = linear_cross_entropy(
            hidden,
            self.head.weight,
            targets,
            bias=self.head.bias,
            token_weights=weights,
            transform=self.transform,
            chunk_rows=self.chunk_rows,
            mixed=self.mixed,
            compile_backend=self.compile_backend,
            kernel=self.kernel,
        )
        return total, rows.numel() if row_weights is None else row_weights.sum(), outputs

    def sequence_logps(
        self, model: Any, inputs: Mapping[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(summed log-probs of the labelled tokens [B] fp32, their count [B], outputs with empty logits).

        The fused `pref_losses.sequence_logps(model(**inputs).logits, labels)`.
        """
        rows, hidden, targets, outputs = self._supervised(model, inputs, labels)
        token = linear_token_logps(
            hidden,
            self.head.weight,
            targets,
            self.head.bias,
            self.transform,
            self.chunk_rows,
            self.mixed,
            self.compile_backend,
            self.kernel,
        )
        batch, time = labels.shape
        sums = torch.zeros(batch, dtype=token.dtype, device=token.device).index_add(0, rows // time, token)
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
        return sums, counts, outputs

    def _supervised(
        self, model: Any, inputs: Mapping[str, Any], labels: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """(flat indices of the labelled positions, their hidden states, their targets, model outputs)."""
        shifted = shifted_labels(labels)
        # Found on the device, the rows are a data-dependent shape (a device sync) taken before the forward
        # is queued; the collator's loss_rows spare it.
        if rows is None:
            rows = target_rows(shifted)
        else:
            rows = rows.to(shifted.device, non_blocking=True)
        with head_input(self.head) as seen:
            outputs = model(**{k: v for k, v in inputs.items() if k not in (LOSS_ROWS, LOSS_ROW_WEIGHTS)})
        if len(seen) != 1:
            raise RuntimeError(f"the output head ran {len(seen)} times in one forward; the probe saw once")
        hidden = seen[0].reshape(-1, seen[0].shape[-1]).index_select(0, rows)
        return rows, hidden, shifted.index_select(0, rows), outputs


def _eager() -> contextlib.AbstractContextManager[Any]:
    """Compiled layers (torch_compile) run eagerly inside: a one-off probe must not compile a graph."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def probe_fused_head(
    model: Any,
    inputs: Mapping[str, Any],
    chunk_rows: int | None = None,
    mixed: torch.dtype | None = None,
    compile_backend: str | None = None,
) -> FusedHead | str:
    """The fused head of an (unwrapped) causal LM, or the reason it cannot be used.

    Runs the model once, without gradients and in eval mode, on the first ``PROBE_TOKENS`` tokens of the
    first row of ``inputs`` and checks that the head applied to what it was given, then the transform,
    reproduces the model's logits.
    """
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no separate output head (get_output_embeddings() is None)"
    if type(head) is not torch.nn.Linear:
        return (
            f"the output head is a {type(head).__module__}.{type(head).__name__}, not a plain Linear "
            "(LoRA or modules_to_save on lm_head, or a quantized head)"
        )
    ids = inputs["input_ids"]
    n = min(PROBE_TOKENS, ids.shape[1])
    # Document boundaries of the whole batch (flash_attn: varlen) do not fit the slice: without them the
    # attention takes its masked path.
    probe = {
        k: v[:1, :n] if isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape[:2] else v
        for k, v in inputs.items()
        if k not in BOUNDARY_KEYS and k not in (LOSS_ROWS, LOSS_ROW_WEIGHTS)
    }
    transform = LogitTransform.from_config(model.config)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _eager(), head_input(head, skip_logits=False) as seen:
            reference = model(**probe).logits.float()
            if len(seen) != 1:
                return f"the output head runs {len(seen)} times in one forward"
            ours = transform.apply(F.linear(seen[0], head.weight, head.bias).float())
    finally:
        model.train(was_training)
    if ours.shape != reference.shape:
        return f"the head's output {tuple(ours.shape)} is not the model's logits {tuple(reference.shape)}"
    error = float((ours - reference).abs().max()) / max(float(reference.abs().max()), 1.0)
    if error > PROBE_TOLERANCE:
        return (
            f"head(hidden) with {transform} differs from the model's logits by {error:.2g} of the largest "
            "logit: the model transforms its logits in a way the fused loss does not know"
        )
    rows = chunk_rows or default_chunk_rows(head.weight.shape[0], head.weight.requires_grad)
    fault = (
        None if compile_backend else kernel_fault(head.weight, transform, compute_dtype(head.weight, mixed))
    )
    if fault:
        logger.warning("fused loss: %s; its softmax runs eagerly (slower, same numbers)", fault)
    return FusedHead(head, transform, rows, mixed, compile_backend, kernel=fault is None)


__all__ = ["FusedHead", "head_input", "probe_fused_head"]
