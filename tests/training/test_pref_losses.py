"""Fast tier: every preference loss against a value worked out by hand on small fixed tensors.

The expected values are written as plain arithmetic (math.log / math.exp), never by calling the formula
under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.training.pref_losses import (
    dpo_loss,
    kto_kl,
    kto_loss,
    mean_logps,
    orpo_loss,
    pair_metrics,
    pairwise_reward_loss,
    sequence_logps,
    simpo_loss,
)

T = torch.tensor
# one pair: policy chosen/rejected -1/-3, reference -2/-2 => h = (-1 - -3) - (-2 - -2) = 2
PC, PR, RC, RR = T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0])


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _approx(t: torch.Tensor, values: list[float]) -> None:
    assert t.tolist() == pytest.approx(values, abs=1e-6)


def test_sequence_logps_sum_count_and_mean():
    # vocab 3; position 0 predicts uniformly (p = 1/3), position 1 predicts [1/4, 1/2, 1/4]
    row = [[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0], [5.0, -5.0, 0.0]]
    logits = T([row, row])
    labels = T([[-100, 1, 1], [-100, -100, 2]])  # targets shift by one: labels[t+1] is predicted at t
    sums, counts = sequence_logps(logits, labels)
    # row 0: log(1/3) + log(1/2); row 1: only position 1 -> token 2: log(1/4)
    _approx(sums, [math.log(1 / 3) + math.log(1 / 2), math.log(1 / 4)])
    assert counts.tolist() == [2, 1]
    _approx(mean_logps(sums, counts), [(math.log(1 / 3) + math.log(1 / 2)) / 2, math.log(1 / 4)])


def test_sequence_logps_no_labels_gives_zero_and_mean_is_finite():
    sums, counts = sequence_logps(torch.zeros(1, 3, 4), T([[-100, -100, -100]]))
    assert sums.tolist() == [0.0] and counts.tolist() == [0]
    assert mean_logps(sums, counts).tolist() == [0.0]


def test_dpo_sigmoid_and_rewards():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    _approx(out.losses, [math.log(1 + math.exp(-1.0))])  # -log sigmoid(0.5 * 2)
    _approx(out.chosen_rewards, [0.5 * (-1 - -2)])
    _approx(out.rejected_rewards, [0.5 * (-3 - -2)])


def test_dpo_sigmoid_label_smoothing_is_cdpo():
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2)
    _approx(out.losses, [0.8 * math.log(1 + math.exp(-1.0)) + 0.2 * math.log(1 + math.exp(1.0))])


def test_dpo_hinge():
    _approx(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge").losses, [0.0])  # 1 - 0.5*2 = 0
    _approx(dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="hinge").losses, [0.5])  # 1 - 0.25*2


def test_dpo_ipo():
    _approx(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo").losses, [(2 - 1) ** 2])  # 1/(2*0.5) = 1
    _approx(dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo").losses, [(2 - 2) ** 2])


def test_dpo_kto_pair_uses_the_other_sides_clamped_batch_kl():
    # pair 0: ratios chosen 1, rejected -1; pair 1: chosen -2 - -2 = 0, rejected -2 - -1 = -1
    out = dpo_loss(
        T([-1.0, -2.0]), T([-3.0, -2.0]), T([-2.0, -2.0]), T([-2.0, -1.0]), beta=0.5, loss_type="kto_pair"
    )
    chosen_kl = max((1 + 0) / 2, 0)  # 0.5
    rejected_kl = max((-1 + -1) / 2, 0)  # -1 floored to 0
    pair0 = ((1 - _sig(0.5 * (1 - rejected_kl))) + (1 - _sig(0.5 * (chosen_kl - -1)))) / 2
    pair1 = ((1 - _sig(0.5 * (0 - rejected_kl))) + (1 - _sig(0.5 * (chosen_kl - -1)))) / 2
    _approx(out.losses, [pair0, pair1])


def test_dpo_loss_refuses_reference_free_types():
    with pytest.raises(ValueError, match="orpo"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="orpo")


def test_orpo():
    # chosen p = 1/2 (odds 1), rejected p = 1/4 (odds 1/3): log-odds ratio = log 3
    out = orpo_loss(T([math.log(0.5)]), T([math.log(0.25)]), beta=0.1)
    _approx(out.losses, [math.log(2) + 0.1 * math.log(1 + 1 / 3)])  # NLL + beta * -log sigmoid(log 3)
    _approx(out.chosen_rewards, [0.1 * math.log(0.5)])
    _approx(out.rejected_rewards, [0.1 * math.log(0.25)])


def test_orpo_is_finite_for_a_certain_model():
    out = orpo_loss(T([0.0]), T([math.log(0.25)]), beta=0.1)
    assert torch.isfinite(out.losses).all()


def test_simpo():
    out = simpo_loss(T([-0.5]), T([-1.5]), beta=2.0, gamma=0.5)
    _approx(out.losses, [math.log(1 + math.exp(-1.5))])  # 2 * (-0.5 - -1.5) - 0.5 = 1.5
    _approx(out.chosen_rewards, [-1.0])
    _approx(out.rejected_rewards, [-3.0])


def test_kto_kl_is_a_detached_mean():
    policy = T([-1.0, -2.0], requires_grad=True)
    kl = kto_kl(policy, T([-2.0, -2.0]))
    assert kl.item() == pytest.approx((1 + 0) / 2)
    assert not kl.requires_grad


def test_kto_loss_weights_and_kl():
    policy, ref, desirable = T([-1.0, -2.0]), T([-2.0, -1.0]), T([True, False])  # ratios 1, -1
    out = kto_loss(policy, ref, desirable, T(0.3), beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    _approx(out.losses, [1 - _sig(0.5 * (1 - 0.3)), 2 * (1 - _sig(0.5 * (0.3 - -1)))])
    _approx(out.rewards, [0.5, -0.5])
    assert out.kl.item() == pytest.approx(0.3)


def test_kto_loss_floors_a_negative_kl_at_zero():
    out = kto_loss(T([-1.0, -2.0]), T([-2.0, -1.0]), T([True, False]), T(-0.4), beta=0.5)
    _approx(out.losses, [1 - _sig(0.5), 1 - _sig(0.5)])
    assert out.kl.item() == 0.0


def test_pairwise_reward_loss():
    _approx(pairwise_reward_loss(T([2.0, 0.0]), T([1.0, 0.0])), [math.log(1 + math.exp(-1)), math.log(2)])


def test_pair_metrics():
    m = pair_metrics(T([1.0, -1.0]), T([0.0, 0.0]))
    assert {k: v.item() for k, v in m.items()} == {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/margins": 0.0,
        "rewards/accuracies": 0.5,
    }


def test_losses_have_gradients_towards_the_chosen_answer():
    """A gradient step on the policy's log-probs raises chosen over rejected for every loss."""
    for name, fn in {
        "sigmoid": lambda c, r: dpo_loss(c, r, RC, RR, beta=0.1).losses,
        "ipo": lambda c, r: dpo_loss(c, r, RC, RR, beta=0.1, loss_type="ipo").losses,
        "orpo": lambda c, r: orpo_loss(c, r, beta=0.1).losses,
        "simpo": lambda c, r: simpo_loss(c, r, beta=2.0, gamma=0.5).losses,
    }.items():
        c, r = T([-2.0], requires_grad=True), T([-2.5], requires_grad=True)
        fn(c, r).sum().backward()
        assert c.grad.item() < 0 < r.grad.item(), name
