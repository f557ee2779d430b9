"""Label-noise models (Damian, Ma & Lee 2021, Sec. 2 and Algorithm 1).

Each is a pure function of (labels, generator): noise is drawn fresh for every
example of every step, on the labels' device, from an explicit ``torch.Generator``.
Nothing here synchronizes with the host, so a step stays capturable.
"""

from __future__ import annotations

import torch

from lnsgd.recipe import NoiseConfig


def flip_labels(labels: torch.Tensor, p: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """With probability p, replace each label by a uniformly random *other* class.

    Adding an offset uniform on {1, …, C−1} modulo C lands on every other class with
    probability 1/(C−1) and never on the true one.
    """
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, (labels + offset) % num_classes, labels)


def sign_noise(targets: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """y + ε with ε uniform on {−σ, +σ} (Algorithm 1): mean 0, variance σ²."""
    bits = torch.randint(0, 2, targets.shape, generator=generator, device=targets.device)
    return targets + sigma * (2 * bits - 1).to(targets.dtype)


def gaussian_noise(targets: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """y + N(0, σ²)."""
    return targets + sigma * torch.randn(targets.shape, generator=generator, device=targets.device, dtype=targets.dtype)


def apply_noise(config: NoiseConfig, targets: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Noised targets for one step under the recipe's noise model."""
    if config.kind == "flip":
        return flip_labels(targets, config.p, num_classes, generator)
    if config.kind == "sign":
        return sign_noise(targets, config.sigma, generator)
    if config.kind == "gaussian":
        return gaussian_noise(targets, config.sigma, generator)
    return targets
