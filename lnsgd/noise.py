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
    # none: plain SGD; smooth: no sampled noise — the loss itself is the expectation
    # (losses.training_loss), so the targets stay clean and the generator is not drawn from.
    return targets


# The training step draws a whole epoch's noise at once, outside its compiled graph
# (dynamo cannot trace an explicit torch.Generator), and picks one row per step.
# ``draw_noise`` + ``noisy_targets`` make the same random draws, in the same order,
# as the functions above, so a row of the draw noises a batch exactly as they would.


def draw_noise(config: NoiseConfig, shape: tuple[int, ...], num_classes: int, generator: torch.Generator,
               device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random numbers for noising targets of ``shape`` (e.g. (steps, B) labels or (steps, B, k) targets)."""
    if config.kind == "flip":
        return {"u": torch.rand(shape, generator=generator, device=device),
                "offset": torch.randint(1, num_classes, shape, generator=generator, device=device)}  # fmt: skip
    if config.kind == "sign":
        return {"bits": torch.randint(0, 2, shape, generator=generator, device=device)}
    if config.kind == "gaussian":
        return {"z": torch.randn(shape, generator=generator, device=device, dtype=dtype)}
    return {}


def noisy_targets(config: NoiseConfig, targets: torch.Tensor, draw: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Targets noised with pre-drawn random numbers shaped like them (no generator: traceable)."""
    if config.kind == "flip":
        return torch.where(draw["u"] < config.p, (targets + draw["offset"]) % num_classes, targets)
    if config.kind == "sign":
        return targets + config.sigma * (2 * draw["bits"] - 1).to(targets.dtype)
    if config.kind == "gaussian":
        return targets + config.sigma * draw["z"].to(targets.dtype)
    return targets
