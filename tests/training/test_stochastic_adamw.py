"""pure_bf16's AdamW: fp32 weights updated exactly as torch's AdamW, bf16 weights and moments rounded
stochastically (unbiased, so updates below bf16's resolution survive on average), and the run picks it."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from tests.training.helpers import LogMessages, load_safetensors, logged_losses, train
from tunesmith.training import stochastic_adamw
from tunesmith.training.stochastic_adamw import StochasticAdamW, stochastic_round_


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in ((37, 5), (11,))]


def _steps(params, optimizer, steps: int = 6) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        optimizer.step()


def test_fp32_weights_are_updated_exactly_as_torch_adamw(monkeypatch):
    monkeypatch.setattr(stochastic_adamw, "SLICE", 64)  # the (37, 5) weight goes in three slices
    ours, theirs = _params(torch.float32), _params(torch.float32)
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]  # noqa: E731
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    _steps(ours, StochasticAdamW(groups(ours), **kw))
    _steps(theirs, torch.optim.AdamW(groups(theirs), foreach=False, **kw))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))
    x = float(lo) + 0.3 * (float(hi) - float(lo))  # 30% of the way up: nearest would always give lo
    out = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(out, torch.full((200_000,), x), torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {float(lo), float(hi)}
    assert (out == hi).float().mean().item() == pytest.approx(0.3, abs=0.01)
    neg = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(neg, torch.full((200_000,), -x), torch.Generator().manual_seed(0))
    assert neg.float().mean().item() == pytest.approx(-x, rel=1e-4)
    exact = torch.empty(3, dtype=torch.bfloat16)
    stochastic_round_(exact, torch.tensor([0.5, -2.0, 0.0]))  # representable values stay
    assert exact.tolist() == [0.5, -2.0, 0.0]


def test_updates_below_bf16_resolution_are_kept_on_average():
    """Weights of 1.0 (bf16 steps of 2**-7 there) pushed by 300 AdamW updates of 1e-4 each: fp32 moves
    them by 0.03, bf16 rounded to nearest not at all, stochastic rounding by 0.03 on average."""
    n, steps, lr = 4096, 300, 1e-4

    def moved(dtype: torch.dtype, optimizer_cls) -> float:
        w = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = optimizer_cls([w], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            w.grad = torch.ones(n, dtype=dtype)  # a constant gradient: each update is -lr
            opt.step()
        return 1.0 - w.float().mean().item()

    exact = moved(torch.float32, torch.optim.AdamW)
    assert exact == pytest.approx(steps * lr, rel=1e-3)
    assert moved(torch.bfloat16, lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw)) == 0.0
    assert moved(torch.bfloat16, StochasticAdamW) == pytest.approx(exact, rel=0.05)


def test_state_round_trips_and_bf16_moments_stay_bf16():
    params = _params(torch.bfloat16)
    opt = StochasticAdamW(params, lr=1e-3, weight_decay=0.01)
    _steps(params, opt, steps=2)
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and float(state["step"]) == 2
    before = state["exp_avg"].clone()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = StochasticAdamW(resumed, lr=1e-3, weight_decay=0.01)
    again.load_state_dict(opt.state_dict())
    _steps(resumed, again, steps=1)  # the loaded moments and step count carry on
    s = again.state[resumed[0]]
    assert float(s["step"]) == 3 and s["exp_avg"].dtype == torch.bfloat16
    assert not torch.equal(s["exp_avg"], before)


def test_a_resumed_optimizer_ends_on_the_same_bf16_weights():
    """The noise generators' states are in the state dict: stopping after step 2 and resuming from the
    saved weights and optimizer state gives, bit for bit, the weights of a run never stopped (and without
    those states, as before, it does not)."""
    params = _params(torch.bfloat16)
    opt = StochasticAdamW(params, lr=1e-3, seed=7)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g).bfloat16() for p in params] for _ in range(5)]

    def run(
        ps: list[torch.nn.Parameter], optimizer: StochasticAdamW, steps: list[list[torch.Tensor]]
    ) -> None:
        for step in steps:
            for p, grad in zip(ps, step, strict=True):
                p.grad = grad.clone()
            optimizer.step()

    def resume(state: dict) -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = StochasticAdamW(ps, lr=1e-3, seed=7)
        optimizer.load_state_dict(state)
        run(ps, optimizer, grads[2:])
        return ps

    run(params, opt, grads[:2])
    saved = torch.load(_saved(opt.state_dict()), weights_only=True)  # through a file, as a checkpoint is
    weights = [p.detach().clone() for p in params]
    run(params, opt, grads[2:])
    assert all(torch.equal(a, b) for a, b in zip(params, resume(saved), strict=True))
    old = resume(
        {k: v for k, v in saved.items() if k != stochastic_adamw.RNG_KEY}
    )  # noise from the seed again
    assert not all(torch.equal(a, b) for a, b in zip(params, old, strict=True))


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_sliced_and_strided_bf16_weights_train_alike(monkeypatch):
    """Slices (a weight over several) and a non-contiguous weight (updated in one pass) give the same
    expected update as one flat pass: each element moves by about lr per step under a constant gradient."""
    monkeypatch.setattr(stochastic_adamw, "SLICE", 1000)
    w = torch.nn.Parameter(torch.ones(64, 96, dtype=torch.bfloat16).t())  # 6,144 elements, transposed
    flat = torch.nn.Parameter(torch.ones(6144, dtype=torch.bfloat16))  # 7 slices
    assert not w.is_contiguous()
    opt = StochasticAdamW([w, flat], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        w.grad, flat.grad = torch.ones_like(w), torch.ones_like(flat)
        opt.step()
    for p in (w, flat):
        assert 1.0 - p.float().mean().item() == pytest.approx(1e-2, rel=0.05)


def test_non_finite_values_stay_non_finite_and_fp16_is_refused():
    out = torch.empty(4, dtype=torch.bfloat16)
    stochastic_round_(out, torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")]))
    assert out[:2].isnan().all() and out[2:].tolist() == [float("inf"), -float("inf")]
    with pytest.raises(ValueError, match="fp16 weights"):
        StochasticAdamW(_params(torch.float16))


def _changed_share(tiny_model_dir, out) -> float:
    """The share of weights the run changed (both sides in bf16, the dtype pure_bf16 trained in)."""
    start, end = (
        load_safetensors(tiny_model_dir / "model.safetensors"),
        load_safetensors(out / "model.safetensors"),
    )
    changed = sum(int((end[k].bfloat16() != start[k].bfloat16()).sum()) for k in start)
    return changed / sum(t.numel() for t in start.values())


def test_pure_bf16_runs_keep_updates_below_bf16_resolution(tiny_model_dir, sft_data, tmp_path):
    """Through the run: pure_bf16 full fine-tuning picks StochasticAdamW (logged) unless stochastic_rounding
    is off. At lr 1e-5 an update is below half a bf16 step of most weights: rounded to nearest, those never
    change; rounded stochastically, most weights move within 12 steps."""
    share = {}
    for rounding in (True, False):
        handler = LogMessages()
        logging.getLogger("tunesmith.train").addHandler(handler)
        out = tmp_path / str(rounding)
        try:
            train(tiny_model_dir, sft_data, out, finetuning_type="full", pure_bf16=True, bf16=True, use_cpu=True,
                  stochastic_rounding=rounding, learning_rate=1e-5, max_steps=12)  # fmt: skip
        finally:
            logging.getLogger("tunesmith.train").removeHandler(handler)
        picked = [m for m in handler.messages if m.startswith("optimizer: AdamW with stochastic rounding")]
        assert len(picked) == (1 if rounding else 0), handler.messages
        assert len(logged_losses(out)) == 12
        share[rounding] = _changed_share(tiny_model_dir, out)
    assert share[True] > 0.3 and share[False] < 0.2, share


def test_pure_bf16_with_another_optimizer_says_updates_are_rounded_to_nearest(
    tiny_model_dir, sft_data, tmp_path
):
    handler = LogMessages()
    logging.getLogger("tunesmith.train").addHandler(handler)
    try:
        train(tiny_model_dir, sft_data, tmp_path, finetuning_type="full", pure_bf16=True, bf16=True, use_cpu=True,
              optim="adafactor", max_steps=2)  # fmt: skip
    finally:
        logging.getLogger("tunesmith.train").removeHandler(handler)
    assert not [m for m in handler.messages if m.startswith("optimizer: AdamW with stochastic rounding")]
    (warned,) = [m for m in handler.messages if m.startswith("optimizer: adafactor updates the bf16 weights")]
    assert "Fix: optim adamw_torch_fused" in warned
