"""Preference losses as pure torch functions: sequence log-probs, the DPO family, ORPO, SimPO, KTO, pairwise RM.

Conventions (as in the papers, TRL and LLaMA-Factory):
- log-probs of a sequence are summed over its labelled tokens; ``ipo``, ``orpo`` and ``simpo`` use the
  length-normalised (mean per token) log-probs instead (`LENGTH_NORMALISED`);
- every loss returns one value per pair (or per sample for KTO); the trainer takes the mean;
- rewards are the implicit rewards ``beta * (policy - reference)`` (``beta * policy`` without a reference),
  detached: they are metrics, not part of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tunesmith.data.collate import IGNORE_INDEX

PrefLoss = Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"]
REFERENCE_FREE: tuple[str, ...] = ("orpo", "simpo")
LENGTH_NORMALISED: tuple[str, ...] = ("ipo", "orpo", "simpo")


@dataclass(frozen=True)
class PairLoss:
    """Per-pair losses and the (detached) implicit rewards of both sides."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class KTOLoss:
    """Per-sample losses, per-sample (detached) rewards, and the KL estimate that was used."""

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over labelled positions, number of them) per sequence; labels shift by one.

    `logits`: (batch, time, vocab); `labels`: (batch, time) with IGNORE_INDEX where there is no target.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    mask = target != IGNORE_INDEX
    safe = target.masked_fill(~mask, 0)
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def mean_logps(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-probs (a sequence without labelled tokens counts one, to avoid 0/0)."""
    return sums / counts.clamp(min=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: PrefLoss = "sigmoid",
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO-family losses with a reference: sigmoid (DPO; label_smoothing > 0: cDPO), hinge, ipo, kto_pair.

    With ``h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)``:
    sigmoid: ``-(1-ls) log s(beta h) - ls log s(-beta h)``; hinge: ``relu(1 - beta h)``;
    ipo: ``(h - 1/(2 beta))^2``; kto_pair: KTO on the two sides with the other side's batch KL.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        # the batch KL of each side, detached and floored at 0, as the reference point of the other side
        chosen_kl = chosen_ratio.mean().clamp(min=0).detach()
        rejected_kl = rejected_ratio.mean().clamp(min=0).detach()
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl))
        rejected_losses = 1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio))
        losses = (chosen_losses + rejected_losses) / 2  # mean over pairs == TRL's mean over both halves
    else:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} needs no reference; use orpo_loss/simpo_loss")
    return PairLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float) -> PairLoss:
    """ORPO (Hong et al. 2024): NLL of chosen + beta * -log s(log odds(chosen) - log odds(rejected)).

    Inputs are length-normalised log-probs; odds(p) = p / (1 - p).
    """
    # log(1 - p) is -inf at p == 1: cap p just below 1 so a fully confident model gives a finite loss
    c = chosen_mean.clamp(max=-1e-6)
    r = rejected_mean.clamp(max=-1e-6)
    log_odds = (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))
    losses = -chosen_mean - beta * F.logsigmoid(log_odds)
    return PairLoss(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def simpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float, gamma: float
) -> PairLoss:
    """SimPO (Meng et al. 2024): ``-log s(beta (chosen - rejected) - gamma)`` on length-normalised log-probs."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return PairLoss(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: mean log-ratio over mismatched (prompt, other completion) pairs, detached.

    Gather it across processes and average before `kto_loss`, which floors it at 0.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO (Ethayarajh et al. 2024) per sample, with ``r = policy - ref`` and ``z = max(kl, 0)``:

    desirable: ``w_d (1 - s(beta (r - z)))``; undesirable: ``w_u (1 - s(beta (z - r)))``.
    """
    z = kl.detach().clamp(min=0)
    ratio = policy_logps - ref_logps
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio)))
    losses = torch.where(desirable.bool(), chosen, rejected)
    return KTOLoss(losses, beta * ratio.detach(), z)


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair: ``-log s(r_chosen - r_rejected)``."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (batch means, detached)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).float().mean(),
    }


__all__ = [
    "LENGTH_NORMALISED",
    "REFERENCE_FREE",
    "KTOLoss",
    "PairLoss",
    "PrefLoss",
    "dpo_loss",
    "kto_kl",
    "kto_loss",
    "mean_logps",
    "orpo_loss",
    "pair_metrics",
    "pairwise_reward_loss",
    "sequence_logps",
    "simpo_loss",
]
