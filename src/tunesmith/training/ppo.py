"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), as TRL's and LLaMA-Factory's PPO.

Per prompt one completion is sampled and scored (a reward model of stage rm, or reward functions). The
per-token reward is ``-kl_coef * (log pi_old - log ref)`` with the score added at the completion's last
token; advantages come from GAE (gamma 1, lambda 0.95) over the value head's estimates and are whitened.
The loss is the clipped policy surrogate plus ``VF_COEF`` times the clipped value loss.

Options: ``ppo_score_norm`` (scores normalised by running mean/std over the run), ``ppo_whiten_rewards``
(per-token rewards whitened over the batch), ``ppo_epochs`` (optimisation steps per rollout batch) and
the KL coefficient: fixed (``ppo_target: null``) or adaptive towards ``ppo_target`` nats per sequence
(Ziegler et al.'s proportional controller, horizon 10000 samples; ``ppo_kl_coef`` is its start value).
Both running statistics (KL coefficient, score moments) move alike on every rank and are part of checkpoints
(`PPO.state_dict`), so a resumed run continues them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.infer.settings import SamplingSettings
from tunesmith.training.grpo import clipped_surrogate
from tunesmith.training.reference import Reference
from tunesmith.training.reward import ValueHeadModel
from tunesmith.training.rewards import RewardFunc, score
from tunesmith.training.rollout import (
    Rollout,
    completion_logits,
    completion_logps,
    masked_mean,
    right_padded,
    rollout_tensors,
    sample,
    token_logps,
)

GAMMA, LAM = 1.0, 0.95
CLIP_RANGE, CLIP_RANGE_VALUE, VF_COEF = 0.2, 0.2, 0.1
KL_HORIZON = 10000


class PolicyValueModel(ValueHeadModel):
    """The policy LM with a value head; forward gives the logits and per-token values of the last positions.

    Saved like a reward model (the LM or its adapter, and value_head.safetensors beside it). The head starts
    at zero: the first advantages are then the rewards themselves, not the noise of a random head, which
    pushes every token of the first batches in a random direction.
    """

    def __init__(self, lm: Any, hidden_size: int, seed: int = 0) -> None:
        super().__init__(lm, hidden_size, seed)
        with torch.no_grad():
            self.v_head.weight.zero_()
            self.v_head.bias.zero_()

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = kw.pop("logits_to_keep")
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=keep,
            **kw,
        )
        hidden = out.hidden_states[-1][:, -keep:]
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
        return out.logits, values


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked positions; the mean is added back when shift_mean is False."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA, lam: float = LAM
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of (N, C) per-token rewards and values; positions past each completion are 0."""
    rewards, values = rewards * mask, values * mask
    last = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < rewards.shape[1] else 0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def token_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards -kl_coef * kl with the score on the last completion token, per-token kl)."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def ppo_loss(
    logps: torch.Tensor,
    values: torch.Tensor,
    batch: dict[str, torch.Tensor],
    clip_range: float = CLIP_RANGE,
    clip_range_value: float = CLIP_RANGE_VALUE,
    vf_coef: float = VF_COEF,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + vf_coef * clipped value loss, token means over the batch; and their metrics."""
    mask = batch["completion_mask"]
    pg, was_clipped = clipped_surrogate(logps, batch["old_logps"], batch["advantages"], clip_range)
    old_v, returns = batch["old_values"], batch["returns"]
    v_clipped = old_v + torch.clamp(values - old_v, -clip_range_value, clip_range_value)
    vf_losses = torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    policy_loss = masked_mean(pg, mask)
    value_loss = 0.5 * masked_mean(vf_losses, mask)
    metrics = {
        "policy_loss": policy_loss.detach(),
        "value_loss": value_loss.detach(),
        "clip_ratio": masked_mean(was_clipped, mask),
        "value_clip_ratio": masked_mean(((values - returns) ** 2 < (v_clipped - returns) ** 2).float(), mask),
        "approx_kl": 0.5 * masked_mean((logps.detach() - batch["old_logps"]) ** 2, mask),
    }
    return policy_loss + vf_coef * value_loss, metrics


@dataclass
class RunningMoments:
    """Mean and std of every score seen so far, over all ranks (Chan et al.'s parallel update)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    def update(self, xs: torch.Tensor) -> None:
        n, mean, var = _global_moments(xs)
        delta, total = mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


@dataclass
class KLController:
    """Fixed (target None) or adaptive KL coefficient: coef *= 1 + clip(kl / target - 1, +-0.2) * n / horizon."""

    coef: float
    target: float | None = None
    horizon: int = KL_HORIZON

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])


def _global_moments(xs: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, population variance) of `xs` over all processes, so every rank's score moments agree."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return xs.numel(), xs.mean().item(), xs.var(unbiased=False).item()
    xs = xs.detach().double()
    sums = torch.stack([xs.sum(), torch.tensor(float(xs.numel()), dtype=xs.dtype, device=xs.device)])
    dist.all_reduce(sums)
    mean = sums[0] / sums[1]
    squares = ((xs - mean) ** 2).sum()
    dist.all_reduce(squares)
    return int(sums[1].item()), mean.item(), (squares / sums[1]).item()


def _global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over processes, so that every rank's adaptive KL coefficient moves alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


@dataclass
class PPO:
    """The PPO algorithm with its engine, scorer (reward model or reward functions) and reference."""

    engine: Any
    settings: SamplingSettings
    reference: Reference
    kl: KLController
    reward_model: Any = None  # a RewardScorer; else reward_funcs
    reward_funcs: Sequence[RewardFunc] = ()
    score_norm: bool = False
    whiten_rewards: bool = False
    pad_id: int = 0
    moments: RunningMoments = field(default_factory=RunningMoments)

    def _scores(self, sampled: Any, device: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.reward_model is not None:
            ids, mask = right_padded(sampled.prompts, sampled.completion_ids, self.pad_id)
            return self.reward_model(ids, mask).to(device), {}
        total, each = score(self.reward_funcs, sampled.texts, sampled.columns)
        means = {f"rewards/{k}": torch.tensor(v, device=device).mean() for k, v in each.items()}
        return torch.tensor(total, dtype=torch.float32, device=device), means

    def rollout(
        self, policy: PolicyValueModel, rows: list[dict[str, Any]], seed: int, learn: bool = True
    ) -> Rollout:
        sampled = sample(self.engine, rows, self.settings.with_overrides(seed=seed))
        device = policy.v_head.weight.device
        raw, extra = self._scores(sampled, device)
        scores = raw
        if self.score_norm:
            if learn:
                self.moments.update(raw)
            scores = (raw - self.moments.mean) / (self.moments.std + 1e-8)
        batch = rollout_tensors(sampled.prompts, sampled.completion_ids, self.pad_id, device)
        mask = batch["completion_mask"].float()
        with torch.no_grad():
            logits, values = completion_logits(policy, batch)
            old_logps = token_logps(logits[:, :-1], batch["completion_ids"]) * mask
            del logits
            with self.reference.model_for(policy.lm) as ref:
                ref_logps = completion_logps(ref, batch)
        values = values[:, :-1].float() * mask
        rewards, kl = token_rewards(scores, old_logps, ref_logps, mask, self.kl.coef)
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask)
        batch.update(
            old_logps=old_logps,
            old_values=values,
            returns=returns,
            advantages=whiten(advantages, mask),
        )
        kl_per_sequence = kl.sum(1).mean()
        metrics = {
            "reward": raw.mean(),
            "reward_std": raw.std() if len(raw) > 1 else torch.zeros((), device=device),
            "kl": kl_per_sequence,
            "kl_coef": torch.tensor(self.kl.coef, device=device),
            "completion_length": mask.sum(1).mean(),
            **extra,
        }
        if learn:
            self.kl.update(_global_mean(kl_per_sequence).item(), len(raw))
        return Rollout(batch, metrics)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue the run: the KL coefficient and the score moments."""
        return {"kl": self.kl.state_dict(), "score_moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["score_moments"])

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, values = completion_logits(model, batch)
        mask = batch["completion_mask"]
        logps = token_logps(logits[:, :-1], batch["completion_ids"]) * mask
        return ppo_loss(logps, values[:, :-1].float() * mask, batch)


__all__ = [
    "PPO",
    "KLController",
    "PolicyValueModel",
    "RunningMoments",
    "gae",
    "ppo_loss",
    "token_rewards",
    "whiten",
]
