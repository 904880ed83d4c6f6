"""What grpo and ppo share: sampling completions with the engine, rollout tensors, completion log-probs,
and a sampler that repeats each generation batch for several optimisation steps.

Layout of a rollout batch (N sequences = prompts x generations): the prompt left-padded to width P, then
the completion right-padded to width C, so every completion starts at column P and the loss needs the
logits of the last C + 1 positions only (``logits_to_keep``). Position ids count real tokens, as
generation does with a left-padded batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.infer.engine import Completion
from tunesmith.infer.settings import SamplingSettings

# prompt-kind columns that are not passed to reward functions
_NOT_COLUMNS = ("input_ids",)


@dataclass
class Rollout:
    """One generation batch ready for the loss: tensors on the training device and its metrics."""

    batch: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class RLAlgorithm(Protocol):
    """A policy-gradient method: what happens at generation time, and the loss of one optimisation step."""

    def rollout(self, policy: Any, rows: list[dict[str, Any]], seed: int, learn: bool = True) -> Rollout:
        """Sample, score and prepare `rows` (no grad); `policy` is the unwrapped trained module. Running
        statistics (adaptive KL, score normalisation) move only when `learn` (training, not evaluation)."""
        ...

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a rollout batch and its metrics; `model` is the (possibly wrapped) trained module."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Running state (JSON-able, the same on every rank) that a checkpoint must carry."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (on resume)."""
        ...


@dataclass(frozen=True)
class Sampled:
    """Completions of a batch of prompt rows, flattened: row i's generations are i*n .. i*n + n - 1."""

    prompts: list[list[int]]  # per completion, its prompt's ids
    completions: list[Completion]
    columns: dict[str, list[Any]]  # reward-function columns, one value per completion
    n: int

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def completion_ids(self) -> list[list[int]]:
        return [c.token_ids for c in self.completions]


def sample(engine: Any, rows: Sequence[dict[str, Any]], settings: SamplingSettings) -> Sampled:
    """settings.n completions per prompt row, with the rows' columns repeated per completion."""
    groups = engine.generate([list(r["input_ids"]) for r in rows], settings)
    completions = [c for group in groups for c in group]
    n = settings.n
    columns: dict[str, list[Any]] = {
        k: [r.get(k) for r in rows for _ in range(n)]
        for k in dict.fromkeys(k for r in rows for k in r)
        if k not in _NOT_COLUMNS
    }
    columns["completion_tokens"] = [c.completion_tokens for c in completions]
    prompts = [list(r["input_ids"]) for r in rows for _ in range(n)]
    return Sampled(prompts, completions, columns, n)


def rollout_tensors(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int, device: Any
) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask/position_ids (N, P + C), completion_ids/completion_mask (N, C), and labels
    (the completion tokens, IGNORE_INDEX elsewhere) for token counting."""
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c) for c in completions))
    n = len(prompts)
    ids = torch.full((n, width_p + width_c), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width_p + width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p, dtype=torch.long)
        mask[i, width_p - len(p) : width_p] = 1
        if c:
            ids[i, width_p : width_p + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, width_p : width_p + len(c)] = 1
    completion_mask = mask[:, width_p:].clone()
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    labels[:, :width_p] = IGNORE_INDEX
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "completion_ids": ids[:, width_p:].clone(),
        "completion_mask": completion_mask,
        "labels": labels,
    }
    return {k: v.to(device) for k, v in batch.items()}


def right_padded(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion right-padded (reward models score the last non-pad token)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position from (N, C, V) logits, one row at a time so only one float copy lives."""
    out = []
    for row_logits, row_targets in zip(logits, targets):
        row = row_logits.float()
        picked = row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(out)


def completion_logits(model: Any, batch: dict[str, torch.Tensor], **kw: Any) -> Any:
    """The model's output over the rollout batch, logits kept for the last C + 1 positions."""
    width_c = batch["completion_ids"].shape[1]
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=width_c + 1,
        use_cache=False,
        **kw,
    )


def completion_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, C) log-probs of the completion tokens under `model` (0 at padding)."""
    logits = completion_logits(model, batch).logits[:, :-1]
    return token_logps(logits, batch["completion_ids"]) * batch["completion_mask"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (a row without any counts one, so it gives 0)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


class RepeatSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, cut into chunks of `chunk` indices, each chunk yielded `repeats` times.

    With chunk = per-device batch x processes x accumulation steps, every process sees the same micro-batches
    `repeats` times in a row: one generation batch serves `repeats` optimisation steps.
    """

    def __init__(self, size: int, chunk: int, repeats: int, seed: int) -> None:
        self.size, self.chunk, self.repeats, self.seed = size, chunk, repeats, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size * self.repeats

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        for start in range(0, self.size, self.chunk):
            part = order[start : start + self.chunk]
            for _ in range(self.repeats):
                yield from part


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt rows stay Python objects: the trainer generates from them."""
    return {"rows": rows}


__all__ = [
    "RLAlgorithm",
    "RepeatSampler",
    "Rollout",
    "Sampled",
    "collate_prompts",
    "completion_logits",
    "completion_logps",
    "masked_mean",
    "right_padded",
    "rollout_tensors",
    "sample",
    "token_logps",
]
