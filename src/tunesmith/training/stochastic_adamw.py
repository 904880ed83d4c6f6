"""AdamW for bf16 weights that keeps small updates: stochastic rounding of the weights and moments (pure_bf16).

With pure_bf16 the trained weights have no fp32 copy. A weight of 0.02 in bf16 moves in steps of about
1e-4, while an AdamW update is about the learning rate (1e-5 for full fine-tuning): rounded to nearest, most
updates vanish, and training stalls (on 2x H200, 50 steps of Qwen2.5-0.5B at lr 1e-5 ended at loss 11.18 in
pure bf16 against 10.18 with fp32 master weights). Here each update is computed in fp32 and written back
rounded up or down at random, with the probability that makes the stored value exact on average
(stochastic rounding, as in torchao's bf16_stochastic_round and Zamirai et al. 2020). The moments live in
the weight's dtype too (bf16: 2 + 2 bytes a weight instead of fp32's 8), rounded the same way, so the second
moment's 0.1% steps are not lost either. fp32 weights are updated exactly, as torch's AdamW does.

The work goes a slice of ``SLICE`` elements at a time, so a 262M-element embedding never needs more than a
few fp32 slices of scratch memory. The noise comes from a generator of its own per device, seeded with the
run's seed (the same on every rank, so data-parallel replicas stay identical): the run's other random
streams (dropout, sampling) are the same as without it. Their states travel in the optimizer's state dict
(key ``RNG_KEY``), so a run resumed from a checkpoint draws the noise it would have drawn and ends on the
same weights as one never stopped. fp16 weights are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

SLICE = 2**24  # elements per slice: six fp32/int32 scratch tensors of 64 MiB at most
RNG_KEY = "stochastic_rounding_rng"  # the noise generators' states, by device, in the optimizer's state dict


def stochastic_round_(
    dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """Write fp32 ``value`` into bf16 ``dst``, each element rounded up or down in magnitude with the
    probability that makes it exact on average. ``value`` is used as scratch space (it is changed).

    bf16 is the top half of fp32's bits: adding a uniform random 16-bit number to the bits and clearing the
    low half rounds the magnitude up with probability (dropped bits / 2**16).
    """
    nan = value.isnan()  # NaN's bits plus noise can carry into the sign or exponent: NaN stays NaN
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    noise.masked_fill_(~value.isfinite(), 0)  # inf and NaN are not rounded
    bits.add_(noise).bitwise_and_(-(1 << 16))
    dst.copy_(value)  # exact: the low bits are zero
    dst.masked_fill_(nan, float("nan"))


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, torch's defaults) whose bf16 weights and
    moments are written back with stochastic rounding."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"StochasticAdamW: invalid lr {lr}, betas {betas}, eps {eps} or weight_decay")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        half = sum(p.dtype == torch.float16 for g in self.param_groups for p in g["params"])
        if half:  # fp16 moments would underflow (v of a gradient below 8e-3 is 0 in fp16)
            raise ValueError(f"StochasticAdamW: fp16 weights ({half}) are not supported; bf16 or fp32 only")
        self.seed = seed  # the same on every rank: data-parallel replicas round alike and stay identical
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus each noise generator's state (by device), for an exact resume."""
        out = super().state_dict()
        out[RNG_KEY] = {str(device): g.get_state() for device, g in self._generators.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's optimizer state; the noise generators carry on where the saved run's were."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(RNG_KEY, {})  # a state dict saved before the generators travelled: fresh noise
        super().load_state_dict(state_dict)
        for device, rng in saved.items():
            self._generator(torch.device(device)).set_state(rng.cpu())

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StochasticAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                step_ = _Step(
                    beta1, beta2, eps, shrink=1 - lr * decay, size=lr / (1 - beta1**step),
                    root=(1 - beta2**step) ** 0.5,
                    generator=self._generator(p.device) if p.dtype == torch.bfloat16 else None,
                )  # fmt: skip
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if not all(t.is_contiguous() for t in tensors):  # no flat view: one elementwise pass
                    step_.apply(*tensors)
                    continue
                flat = [t.view(-1) for t in tensors]
                for start in range(0, p.numel(), SLICE):
                    step_.apply(*(t[start : start + SLICE] for t in flat))
        return loss


@dataclass(frozen=True)
class _Step:
    """One weight's update at one step: the coefficients, and the noise for its bf16 write-back."""

    beta1: float
    beta2: float
    eps: float
    shrink: float  # 1 - lr * weight_decay
    size: float  # lr / bias correction 1
    root: float  # sqrt(bias correction 2)
    generator: torch.Generator | None

    def apply(self, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        """One slice: the fp32 update (`.float()` of an fp32 tensor is the tensor itself: updated in place)."""
        g32, m32, v32, w32 = g.float(), m.float(), v.float(), w.float()
        m32.lerp_(g32, 1 - self.beta1)
        v32.mul_(self.beta2).addcmul_(g32, g32, value=1 - self.beta2)
        denom = v32.sqrt().div_(self.root).add_(self.eps)
        if self.shrink != 1:
            w32.mul_(self.shrink)
        w32.addcdiv_(m32, denom, value=-self.size)
        for dst, value in ((w, w32), (m, m32), (v, v32)):
            if dst.dtype == torch.bfloat16:
                stochastic_round_(dst, value, self.generator)
            elif dst is not value:
                dst.copy_(value)


__all__ = ["SLICE", "StochasticAdamW", "stochastic_round_"]
