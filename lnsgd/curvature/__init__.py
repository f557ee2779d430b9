"""Curvature of the training loss: one Hessian-vector operator, estimators on it.

The operator (``hessian_matvec``) is a matrix-free product v ↦ ∇²L(θ)·v of the
*mean* loss over a fixed set of examples. The estimators below are pure
functions of any symmetric operator — a callable mapping a flat 1-D tensor of
length ``dim`` to another, or a dense symmetric 2-D tensor — and a
``torch.Generator``:

- ``estimate_trace``      tr A by Hutchinson, Hutch++ or XTrace (default)
- ``lanczos`` / ``top_eigenvalues``   Lanczos with full reorthogonalization
- ``estimate_R``          Damian, Ma & Lee's regularizer R(θ) by deflated SLQ
- ``spectral_density``    stochastic Lanczos quadrature nodes and weights

For a model's loss, ``trace_hessian`` splits tr∇²L = tr G + tr(∇²L − G): the
Gauss–Newton part exactly from per-example Jacobians (``exact_trace_gauss_newton``),
only the small residual by probes (``residual_matvec``). ``trace_gauss_newton``
estimates tr G from vector-Jacobian products only, and ``R_exact`` is the closed
form of R from eigenvalues (for tests and theory).

Dtype and device of the random probes: the ``dtype=``/``device=`` keyword if
given, else the operator's ``.dtype``/``.device`` attribute (``hessian_matvec``
and dense tensors have them), else float32 on the CPU. Small dense algebra
(tridiagonal eigenproblems, s×s triangular solves) is done in float64.

Nothing here prints or logs; bad input raises ``LnsgdError`` naming the argument.

One module per job:

- ``operators``     the Hessian operator of a model's mean loss, the dense Hessian,
                    and the checks and probes every estimator shares
- ``trace``         trace estimators, and tr A = tr G + tr(A − G) with tr G known
- ``lanczos``       Lanczos, Ritz pairs, top eigenvalues, spectral density
- ``regularizer``   R(θ): its closed form, where it is defined, its estimate
- ``gauss_newton``  tr G (by VJPs or exactly), the residual ∇²L − G, ``trace_hessian``
- ``linearity``     whether every parameter enters the model linearly (then tr∇²L = tr G)

The losses (from ``lnsgd.losses``, shared with the training loop) are re-exported.
"""

from __future__ import annotations

from lnsgd.curvature.gauss_newton import (
    exact_trace_gauss_newton,
    loss_kind,
    residual_matvec,
    trace_gauss_newton,
    trace_hessian,
)
from lnsgd.curvature.lanczos import LanczosResult, lanczos, ritz_pairs, spectral_density, top_eigenvalues
from lnsgd.curvature.linearity import is_piecewise_linear
from lnsgd.curvature.operators import (
    HessianOperator,
    dense_hessian,
    evaluation_mode,
    flatten_params,
    hessian_matvec,
)
from lnsgd.curvature.regularizer import R_exact, REstimate, RUndefinedError, estimate_R
from lnsgd.curvature.trace import (
    SplitTraceEstimate,
    TraceEstimate,
    choose_trace,
    estimate_trace,
    exact_split,
    split_trace,
)
from lnsgd.losses import (
    CrossEntropyLoss,
    MSELoss,
    SmoothedCrossEntropy,
    cross_entropy_loss,
    mse_loss,
    smoothed_cross_entropy,
)

__all__ = [
    "CrossEntropyLoss",
    "HessianOperator",
    "LanczosResult",
    "MSELoss",
    "REstimate",
    "RUndefinedError",
    "R_exact",
    "SplitTraceEstimate",
    "SmoothedCrossEntropy",
    "TraceEstimate",
    "choose_trace",
    "cross_entropy_loss",
    "dense_hessian",
    "estimate_R",
    "estimate_trace",
    "evaluation_mode",
    "exact_split",
    "exact_trace_gauss_newton",
    "flatten_params",
    "hessian_matvec",
    "is_piecewise_linear",
    "lanczos",
    "loss_kind",
    "mse_loss",
    "residual_matvec",
    "ritz_pairs",
    "smoothed_cross_entropy",
    "spectral_density",
    "split_trace",
    "top_eigenvalues",
    "trace_gauss_newton",
    "trace_hessian",
]
