"""Losses: the clean training loss and its expectation under the label noise.

The theory's L is the training loss in expectation over the label noise
(Damian, Ma & Lee 2021, Sec. 2). For flip noise with probability p over C classes
that is the label-smoothed cross-entropy

    E[CE(ỹ)] = (1 − p)·CE(y) + p/(C − 1)·Σ_{c≠y} CE(c),

and for ±σ or Gaussian noise with ℓ = ½‖f − y‖² it is the clean loss + kσ²/2
(k outputs), whose Hessian equals the clean one. Every loss is a mean over the batch
and carries ``kind`` ("cross_entropy" or "mse") so curvature code can pick the
right output-space Hessian.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CrossEntropy:
    """Mean cross-entropy of logits against integer labels."""

    kind = "cross_entropy"

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def __repr__(self) -> str:
        return "CrossEntropy()"


class SmoothedCrossEntropy:
    """E over flip noise of CE: (1−p)·CE(y) + p/(C−1)·Σ_{c≠y} CE(c), mean over the batch."""

    kind = "cross_entropy"

    def __init__(self, p: float, num_classes: int):
        self.p, self.num_classes = float(p), int(num_classes)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        ce_true = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ce_all = -logp.sum(-1)  # Σ_c CE(c)
        per_example = (1 - self.p) * ce_true + self.p / (self.num_classes - 1) * (ce_all - ce_true)
        return per_example.mean()

    def __repr__(self) -> str:
        return f"SmoothedCrossEntropy(p={self.p}, num_classes={self.num_classes})"


class HalfSquaredError:
    """Mean over examples of ½‖f − y‖² (summed over outputs)."""

    kind = "mse"

    def __init__(self, offset: float = 0.0):
        self.offset = float(offset)  # kσ²/2 for the expected loss under ±σ/Gaussian noise

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        targets = targets.to(outputs.dtype).reshape(outputs.shape)
        return 0.5 * (outputs - targets).pow(2).flatten(1).sum(-1).mean() + self.offset

    def __repr__(self) -> str:
        return f"HalfSquaredError(offset={self.offset})"


def clean_loss(kind: str):
    """The training loss on clean targets."""
    return CrossEntropy() if kind == "cross_entropy" else HalfSquaredError()


def expected_loss(kind: str, noise_kind: str, p: float, sigma: float, num_outputs: int):
    """The loss in expectation over the label noise (what the theory calls L)."""
    if kind == "cross_entropy":
        return SmoothedCrossEntropy(p, num_outputs) if noise_kind == "flip" and p > 0 else CrossEntropy()
    if noise_kind in ("sign", "gaussian"):
        return HalfSquaredError(offset=num_outputs * sigma**2 / 2)
    return HalfSquaredError()
