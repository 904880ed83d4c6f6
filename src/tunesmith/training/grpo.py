"""Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath): pure loss pieces and the algorithm.

Per prompt, `num_generations` completions are sampled and scored; each completion's advantage is its
reward relative to its group, ``(r - mean_group) / (std_group + 1e-4)`` (std with Bessel's correction, as
TRL). The loss per completion token is the clipped surrogate ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)``
with ``rho = pi / pi_old`` (pi_old: the policy that sampled; rho == 1 with one optimisation step per
generation) plus ``beta * KL`` to the reference with the k3 estimator ``exp(ref - pi) - (ref - pi) - 1``;
it is averaged over each completion's tokens, then over completions (the paper's normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.infer.settings import SamplingSettings
from tunesmith.training.reference import Reference
from tunesmith.training.rewards import RewardFunc, score
from tunesmith.training.rollout import (
    Rollout,
    completion_logps,
    masked_mean,
    rollout_tensors,
    sample,
)

STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out group by group (N = prompts x group)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + STD_EPS)).view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - pi) - (ref - pi) - 1 (>= 0, unbiased; Schulman's k3)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss -min(rho A, clip(rho) A), and where the clipped term was the smaller one."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of (N, C) completion-token log-probs with (N,) advantages; metrics: kl, clip_ratio."""
    per_token, was_clipped = clipped_surrogate(logps, old_logps, advantages.unsqueeze(1), epsilon)
    metrics = {"clip_ratio": masked_mean(was_clipped, mask)}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = masked_mean(per_token, mask, dim=1).mean()
    return loss, metrics


@dataclass
class GRPO:
    """The GRPO algorithm (see the module docstring) with its engine, reward functions and reference."""

    engine: Any
    settings: SamplingSettings  # n = num_generations
    reward_funcs: Sequence[RewardFunc]
    reference: Reference | None  # None when beta is 0: no reference pass at all
    epsilon: float = 0.2
    beta: float = 0.04
    keep_old_logps: bool = False  # iterations > 1: the sampling policy's log-probs are needed
    pad_id: int = 0

    def rollout(self, policy: Any, rows: list[dict[str, Any]], seed: int, learn: bool = True) -> Rollout:
        sampled = sample(self.engine, rows, self.settings.with_overrides(seed=seed))
        rewards, each = score(self.reward_funcs, sampled.texts, sampled.columns)
        device = next(policy.parameters()).device
        r = torch.tensor(rewards, dtype=torch.float32, device=device)
        batch = rollout_tensors(sampled.prompts, sampled.completion_ids, self.pad_id, device)
        batch["advantages"] = group_advantages(r, sampled.n)
        with torch.no_grad():
            if self.keep_old_logps:
                batch["old_logps"] = completion_logps(policy, batch)
            if self.reference is not None:
                with self.reference.model_for(policy) as ref:
                    batch["ref_logps"] = completion_logps(ref, batch)
        lengths = batch["completion_mask"].sum(1).float()
        metrics = {
            "reward": r.mean(),
            "reward_std": r.std() if len(r) > 1 else torch.zeros((), device=device),
            "completion_length": lengths.mean(),
            **{f"rewards/{name}": torch.tensor(v, device=device).mean() for name, v in each.items()},
        }
        return Rollout(batch, metrics)

    def state_dict(self) -> dict[str, Any]:
        """Nothing carries over between generation batches: advantages are per group, beta is fixed."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise TunesmithError(
                f"grpo keeps no running state, but the checkpoint holds {sorted(state)} "
                "(from another stage?). Fix: resume from a checkpoint of a grpo run"
            )

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = completion_logps(model, batch)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        return grpo_loss(
            logps,
            old,
            batch["advantages"],
            batch["completion_mask"],
            epsilon=self.epsilon,
            beta=self.beta,
            ref_logps=batch.get("ref_logps"),
        )


__all__ = ["GRPO", "clipped_surrogate", "group_advantages", "grpo_loss", "k3_kl"]
