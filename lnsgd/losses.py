"""Losses: the clean training loss and its expectation under the label noise.

The theory's L is the training loss in expectation over the label noise
(Damian, Ma & Lee 2021, Sec. 2). For flip noise with probability p over C classes
that is the label-smoothed cross-entropy

    E[CE(ỹ)] = (1 − p)·CE(y) + p/(C − 1)·Σ_{c≠y} CE(c),

and for ±σ or Gaussian noise with ℓ = ½‖f − y‖² it is the clean loss + kσ²/2
(k outputs), whose Hessian equals the clean one. ``noise.kind=smooth`` trains on the
smoothed cross-entropy itself, with no sampled noise (``training_loss``), and
``expected_loss_minimum`` is the floor of each expected loss over predictions (so
``train/expected_loss_gap`` reads 0 on the manifold of minimizers). Every loss is a mean over the batch
and carries ``kind`` ("cross_entropy" or "mse") so curvature code can pick the
right output-space Hessian. Half-precision outputs (bf16 autocast) are promoted to
float32; float64 stays float64 (curvature tests use it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lnsgd.errors import LnsgdError


def _promote(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

class CrossEntropyLoss:
    """Mean cross-entropy of logits ``(n, C)`` against class indices ``(n,)``."""

    kind = "cross_entropy"

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(_promote(logits), y)

    def __repr__(self) -> str:
        return "cross_entropy_loss"


class SmoothedCrossEntropy:
    """The flip-noise expected loss (1−p)·CE(y) + p/(C−1)·Σ_{c≠y} CE(c), batch mean.

    This is the training loss in expectation over label flipping with
    probability ``p`` to a uniformly random *other* class — the L whose
    regularized stationary points Damian et al. (2021) characterize. Its Hessian
    with respect to the logits, diag(p) − p pᵀ, does not depend on the target.
    """

    kind = "cross_entropy"

    def __init__(self, p: float, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise LnsgdError(f"num_classes must be an integer ≥ 2; got {num_classes!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise LnsgdError(f"flip probability p must be a number in [0, 1]; got {p!r}")
        self.p = float(p)
        self.num_classes = num_classes

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise LnsgdError(
                f"smoothed_cross_entropy(p={self.p}, num_classes={self.num_classes}) needs "
                f"logits of shape (n, {self.num_classes}); got {tuple(logits.shape)}"
            )
        log_probs = F.log_softmax(_promote(logits), dim=1)
        picked = log_probs.gather(1, y.long().unsqueeze(1)).squeeze(1)
        others = log_probs.sum(1) - picked
        per_example = -((1.0 - self.p) * picked + self.p / (self.num_classes - 1) * others)
        return per_example.mean()

    def __repr__(self) -> str:
        return f"smoothed_cross_entropy(p={self.p}, num_classes={self.num_classes})"


class MSELoss:
    """Mean over examples of ½‖f − y‖² (not averaged over output dimensions).

    With this scaling the Hessian of the loss with respect to the output is the
    identity, matching Algorithm 1 of Damian et al. (2021). A trailing output
    dimension of 1 is squeezed when ``y`` is 1-D.
    """

    kind = "mse"

    def __init__(self, offset: float = 0.0):
        self.offset = float(offset)  # kσ²/2: the expected loss under ±σ/Gaussian noise

    def __call__(self, f: Tensor, y: Tensor) -> Tensor:
        f = _promote(f)
        if f.ndim == 2 and f.shape[1] == 1 and y.ndim == 1:
            f = f.squeeze(1)
        if f.shape != y.shape:
            raise LnsgdError(f"mse_loss needs targets shaped like the outputs {tuple(f.shape)}; got {tuple(y.shape)}")
        diff = f - y.to(f.dtype)
        return 0.5 * diff.pow(2).reshape(diff.shape[0], -1).sum(1).mean() + self.offset

    def __repr__(self) -> str:
        return f"mse_loss(offset={self.offset})" if self.offset else "mse_loss"


cross_entropy_loss = CrossEntropyLoss()
mse_loss = MSELoss()


def smoothed_cross_entropy(p: float, num_classes: int) -> SmoothedCrossEntropy:
    """The expected cross-entropy under label flipping with probability ``p``."""
    return SmoothedCrossEntropy(p, num_classes)



def clean_loss(kind: str):
    """The training loss on clean targets."""
    return cross_entropy_loss if kind == "cross_entropy" else mse_loss


def training_loss(kind: str, noise_kind: str, p: float, num_classes: int):
    """The loss the optimizer minimizes at each step, on the step's (possibly noised) targets.

    For ``noise.kind=smooth`` that is flip noise's expected loss itself — the smoothed
    cross-entropy on clean labels, no sampled noise (the authors' ``smoothing``
    without ``label_noise``): it has the same L as flip noise but no noise-driven
    regularizer, so it separates the two. Every other kind trains on the clean loss
    of the noised targets (``noise.apply_noise``).
    """
    if noise_kind == "smooth":
        if kind != "cross_entropy":
            raise LnsgdError(f"noise.kind=smooth needs loss=cross_entropy; got loss={kind}")
        return SmoothedCrossEntropy(p, num_classes)
    return clean_loss(kind)


def expected_loss(kind: str, noise_kind: str, p: float, sigma: float, num_outputs: int):
    """The loss in expectation over the label noise (what the theory calls L).

    For smooth "noise" the training loss is already that expectation, so it is its own.
    """
    if kind == "cross_entropy":
        smoothed = noise_kind in ("flip", "smooth") and p > 0
        return SmoothedCrossEntropy(p, num_outputs) if smoothed else cross_entropy_loss
    if noise_kind in ("sign", "gaussian"):
        return MSELoss(offset=num_outputs * sigma**2 / 2)
    return mse_loss


def expected_loss_minimum(kind: str, noise_kind: str, p: float, sigma: float, num_outputs: int) -> float:
    """The minimum over predictions of ``expected_loss(...)`` per example.

    ``train/expected_loss`` minus this is ≥ 0 and goes to 0 on the manifold of
    expected-loss minimizers the theory speaks of (the authors log their smoothed loss
    minus the same minimum).

    - flip / smooth with cross-entropy: the entropy of the smoothed target
      distribution q (1−p on the label, p/(C−1) on each other class), attained at
      softmax(f) = q: H(q) = −(1−p)·log(1−p) − p·log(p/(C−1)).
    - clean cross-entropy (any other noise kind): 0, an infimum approached as the
      logits grow, never attained.
    - ±σ or Gaussian noise with ½‖f − y‖² (k outputs): the noise term kσ²/2, attained at f = y.
    - clean MSE: 0.
    """
    if kind == "cross_entropy":
        if noise_kind not in ("flip", "smooth") or p == 0:
            return 0.0
        if num_outputs < 2:
            raise LnsgdError(f"label smoothing over {num_outputs} class(es) is undefined; need ≥ 2 classes")
        keep = -(1 - p) * math.log(1 - p) if p < 1 else 0.0
        return keep - p * math.log(p / (num_outputs - 1))
    if noise_kind in ("sign", "gaussian"):
        return num_outputs * sigma**2 / 2
    return 0.0
