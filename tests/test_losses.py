"""Losses: the loss each noise kind trains on, and the floor of its expected loss, against closed
forms, PyTorch's own label smoothing, scipy's entropy and a numeric minimization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy

from lnsgd.errors import LnsgdError
from lnsgd.losses import (
    MSELoss,
    SmoothedCrossEntropy,
    cross_entropy_loss,
    expected_loss,
    expected_loss_minimum,
    mse_loss,
    smoothed_cross_entropy,
    training_loss,
)


def test_smooth_trains_on_the_smoothed_cross_entropy_other_kinds_on_the_clean_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    loss = training_loss("cross_entropy", "smooth", 0.2, 10)
    assert isinstance(loss, SmoothedCrossEntropy) and (loss.p, loss.num_classes) == (0.2, 10)
    # PyTorch's label_smoothing=ε mixes with the uniform over all C classes: ε/C off the label.
    # Flip smoothing puts p/(C−1) on every other class, i.e. ε = p·C/(C−1).
    reference = F.cross_entropy(logits, y, label_smoothing=0.2 * 10 / 9)
    torch.testing.assert_close(loss(logits, y), reference, rtol=1e-12, atol=1e-12)
    for noise in ("flip", "none"):
        assert training_loss("cross_entropy", noise, 0.2, 10) is cross_entropy_loss
    for noise in ("sign", "gaussian", "none"):
        assert training_loss("mse", noise, 0.0, 1) is mse_loss
    with pytest.raises(LnsgdError, match="smooth needs loss=cross_entropy"):
        training_loss("mse", "smooth", 0.2, 10)


def test_smooth_is_its_own_expected_loss():
    a = expected_loss("cross_entropy", "smooth", 0.2, 0.0, 10)
    b = expected_loss("cross_entropy", "flip", 0.2, 0.0, 10)
    assert isinstance(a, SmoothedCrossEntropy) and (a.p, a.num_classes) == (b.p, b.num_classes) == (0.2, 10)


@pytest.mark.parametrize(
    "p, C, hand",
    [
        (0.2, 10, 0.8 * math.log(1 / 0.8) + 0.2 * math.log(9 / 0.2)),  # the paper's setting: 0.93985
        (0.5, 2, math.log(2)),  # q uniform over 2 classes
        (0.9, 10, math.log(10)),  # p = (C−1)/C: q uniform over 10 classes
    ],
)
def test_expected_loss_minimum_is_the_entropy_of_the_smoothed_targets(p, C, hand):
    q = [1 - p] + [p / (C - 1)] * (C - 1)
    for noise in ("flip", "smooth"):
        value = expected_loss_minimum("cross_entropy", noise, p, 0.0, C)
        assert value == pytest.approx(hand, rel=1e-12)
        assert value == pytest.approx(entropy(q), rel=1e-12)  # scipy: −Σ q log q
    assert expected_loss_minimum("cross_entropy", "flip", 0.2, 0.0, 10) == pytest.approx(0.9398473390054318, rel=1e-12)


def test_expected_loss_minimum_of_clean_and_regression_losses():
    assert expected_loss_minimum("cross_entropy", "none", 0.0, 0.0, 10) == 0.0
    assert expected_loss_minimum("cross_entropy", "flip", 0.0, 0.0, 10) == 0.0  # p = 0: clean CE
    assert expected_loss_minimum("mse", "none", 0.0, 0.0, 3) == 0.0
    # ±σ and Gaussian noise with ½‖f − y‖²: E = clean + kσ²/2, minimized (clean = 0) at f = y.
    for noise in ("sign", "gaussian"):
        assert expected_loss_minimum("mse", noise, 0.0, 0.5, 3) == pytest.approx(3 * 0.25 / 2)


def test_smoothed_cross_entropy_is_minimized_at_the_smoothed_targets_with_value_the_minimum():
    p, C, n = 0.2, 10, 8
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, C, (n,), generator=g)
    loss = SmoothedCrossEntropy(p, C)
    minimum = expected_loss_minimum("cross_entropy", "flip", p, 0.0, C)
    q = torch.full((n, C), p / (C - 1), dtype=torch.float64)
    q[torch.arange(n), y] = 1 - p
    at_q = q.log().requires_grad_(True)  # softmax(log q) = q
    value = loss(at_q, y)
    (grad,) = torch.autograd.grad(value, at_q)
    assert value.item() == pytest.approx(minimum, rel=1e-12)
    assert grad.abs().max().item() < 1e-12  # a stationary point; the loss is convex in the logits
    for _ in range(20):
        assert loss(torch.randn(n, C, generator=g, dtype=torch.float64) * 3, y).item() > minimum
    # An independent numeric minimization from random logits reaches the same floor.
    z = torch.randn(n, C, generator=g, dtype=torch.float64).requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        v = loss(z, y)
        v.backward()
        return v

    opt.step(closure)
    assert loss(z, y).item() == pytest.approx(minimum, abs=1e-9)


def test_clean_cross_entropy_only_approaches_its_floor_of_zero():
    y = torch.tensor([0, 1])
    values = [cross_entropy_loss(torch.eye(2, dtype=torch.float64)[y] * s, y).item() for s in (1.0, 10.0, 30.0)]
    # Two classes with logit margin s: CE = log(1 + e^(−s)) > 0, → 0 as s grows.
    assert values == pytest.approx([math.log1p(math.exp(-s)) for s in (1.0, 10.0, 30.0)], rel=1e-9)
    assert values[2] > expected_loss_minimum("cross_entropy", "none", 0.0, 0.0, 2) == 0.0


def test_mse_expected_loss_floor_is_its_offset():
    k, sigma = 3, 0.5
    loss = expected_loss("mse", "gaussian", 0.0, sigma, k)
    assert isinstance(loss, MSELoss)
    minimum = expected_loss_minimum("mse", "gaussian", 0.0, sigma, k)
    y = torch.randn(5, k, generator=torch.Generator().manual_seed(2))
    assert loss(y.clone(), y).item() == pytest.approx(minimum)  # f = y
    # Monte Carlo of the definition: E over ε ~ N(0, σ²) of ½‖y − (y + ε)‖² = kσ²/2.
    eps = sigma * torch.randn(200_000, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert (0.5 * eps.pow(2).sum(1)).mean().item() == pytest.approx(minimum, rel=0.01)
    assert loss(y + 0.1, y).item() > minimum


def test_losses_carry_their_kind_and_match_torch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=g)
    assert cross_entropy_loss.kind == "cross_entropy"
    assert mse_loss.kind == "mse"
    assert torch.allclose(cross_entropy_loss(logits, y), F.cross_entropy(logits, y))
    # Smoothed CE = CE against soft targets (1-p on y, p/(C-1) elsewhere).
    p = 0.2
    soft = torch.full((7, 4), p / 3, dtype=torch.float64)
    soft[torch.arange(7), y] = 1 - p
    smoothed = smoothed_cross_entropy(p, 4)
    assert smoothed.kind == "cross_entropy"
    assert torch.allclose(smoothed(logits, y), F.cross_entropy(logits, soft))
    assert torch.allclose(smoothed_cross_entropy(0.0, 4)(logits, y), F.cross_entropy(logits, y))
    # MSE: ½‖f−y‖² per example, mean over examples; (n,1) outputs squeeze to 1-D targets.
    f = torch.randn(7, 1, generator=g, dtype=torch.float64)
    t = torch.randn(7, generator=g, dtype=torch.float64)
    assert torch.allclose(mse_loss(f, t), 0.5 * ((f.squeeze(1) - t) ** 2).mean())
    f2, t2 = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    assert torch.allclose(mse_loss(f2, t2), 0.5 * ((f2 - t2) ** 2).sum(1).mean())


def test_loss_helpers_reject_bad_input():
    with pytest.raises(LnsgdError, match="p must be"):
        smoothed_cross_entropy(1.5, 10)
    with pytest.raises(LnsgdError, match="num_classes"):
        smoothed_cross_entropy(0.2, 1)
    with pytest.raises(LnsgdError, match="shape"):
        smoothed_cross_entropy(0.2, 10)(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(LnsgdError, match="mse_loss"):
        mse_loss(torch.zeros(3, 2), torch.zeros(3))
