"""Label-noise models against their defining distributions."""

from __future__ import annotations

import math

import torch

from lnsgd.noise import flip_labels, gaussian_noise, sign_noise


def test_flip_rate_is_p_and_never_the_true_label():
    g = torch.Generator().manual_seed(0)
    n, C, p = 200_000, 10, 0.2
    y = torch.randint(0, C, (n,), generator=g)
    noisy = flip_labels(y, p, C, g)
    flipped = noisy != y
    rate = flipped.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    # A flipped label never equals the true one (offset is in 1..C-1), so flipped == changed.
    offsets = (noisy - y) % C
    assert set(offsets[flipped].unique().tolist()) <= set(range(1, C))


def test_flipped_labels_are_uniform_over_the_other_classes():
    g = torch.Generator().manual_seed(1)
    n, C = 90_000, 10
    y = torch.full((n,), 3)
    noisy = flip_labels(y, 0.999999, C, g)
    counts = torch.bincount(noisy, minlength=C).double()
    assert counts[3] == 0
    others = counts[torch.arange(C) != 3]
    expected = n / (C - 1)
    chi2 = ((others - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # χ²(8) at p = 0.9995


def test_sign_noise_is_plus_minus_sigma_with_mean_0_and_variance_sigma2():
    g = torch.Generator().manual_seed(2)
    y = torch.zeros(100_000, 3)
    eps = sign_noise(y, 0.7, g) - y
    assert set(eps.unique().tolist()) == {-0.7, 0.7} or torch.allclose(eps.abs(), torch.full_like(eps, 0.7))
    assert abs(eps.mean().item()) < 5 * 0.7 / math.sqrt(eps.numel())
    assert abs(eps.var().item() - 0.49) < 1e-3


def test_gaussian_noise_moments():
    g = torch.Generator().manual_seed(3)
    y = torch.ones(200_000)
    eps = gaussian_noise(y, 0.5, g) - y
    assert abs(eps.mean().item()) < 5 * 0.5 / math.sqrt(y.numel())
    assert abs(eps.var().item() - 0.25) < 0.005


def test_noise_is_reproducible_from_the_generator_state():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 10, (1000,))
    state = g.get_state()
    a = flip_labels(y, 0.3, 10, g)
    g.set_state(state)
    assert torch.equal(a, flip_labels(y, 0.3, 10, g))


def test_smooth_leaves_targets_clean_and_draws_nothing():
    from lnsgd.noise import apply_noise
    from lnsgd.recipe import NoiseConfig

    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 10, (1000,))
    state = g.get_state()
    out = apply_noise(NoiseConfig(kind="smooth", p=0.2), y, 10, g)
    assert torch.equal(out, y)
    assert torch.equal(g.get_state(), state)  # the noise stream is untouched
