"""Trace estimators of a symmetric operator A from matrix-vector products.

``estimate_trace`` is Hutchinson (1989), Hutch++ (Meyer, Musco, Musco & Woodruff,
SOSA 2021) or XTrace (Epperly, Tropp & Webber, SIMAX 2024; the default), each a
pure function of the operator, a budget of products and a ``torch.Generator``.
Where part of A is known exactly — tr G of the Gauss–Newton matrix — the rest is
estimated alone: ``split_trace`` probes A − G, and ``choose_trace`` spends a small
pilot to probe whichever of A or A − G has the smaller variance. Both return a
``SplitTraceEstimate`` holding the two parts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lnsgd.curvature.operators import Matvec, Operator, check_int, gaussian, mean_and_stderr, rademacher, resolve_generator
from lnsgd.errors import LnsgdError

# ---------------------------------------------------------------------------
# Trace: Hutchinson, Hutch++, XTrace.
# ---------------------------------------------------------------------------


class TraceEstimate(NamedTuple):
    """A trace estimate: ``value`` ± ``stderr`` (a standard error) from ``num_matvecs`` products by ``method``."""

    value: float
    stderr: float
    num_matvecs: int
    method: str


_TRACE_MIN_MATVECS = {"hutchinson": 2, "hutchpp": 4, "xtrace": 4}


_TRACE_WHY = {
    "hutchinson": "two probes, so that a standard error exists",
    "hutchpp": "a sketch of one vector plus two residual probes",
    "xtrace": "two test vectors at two products each, so that a standard error exists",
}


def estimate_trace(
    matvec: Matvec | Tensor,
    dim: int,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    method: str = "xtrace",
    *,
    dtype: torch.dtype | None = None,
    device=None,
) -> TraceEstimate:
    """Estimate tr A of a symmetric operator from ``num_matvecs`` products.

    Methods:
    - ``"hutchinson"``: mean of zᵀAz over Rademacher z (Hutchinson 1989).
    - ``"hutchpp"``: Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): trace of
      a rank-m/3 sketch exactly, Hutchinson on the rest.
    - ``"xtrace"`` (default): XTrace (Epperly,
      Tropp & Webber, SIMAX 2024), the exchangeable version of Hutch++ in which
      every test vector serves both for the low-rank sketch and, left out in
      turn, as a Hutchinson probe; Rademacher test vectors with the paper's
      improved normalization, and the paper's error estimate: the standard
      error of the mean of the s leave-one-out estimates. These share one
      sketch, so it runs optimistic: on a known spectrum (dim 500, 100
      products, 200 seeds) error/stderr had standard deviation 1.35, not 1.

    XTrace gains most where the top of the spectrum holds much of ‖A‖_F (on a
    partly trained tiny MLP: 0.2-0.3% error at 100 products against Hutchinson's
    2.5%); on flat spectra it is about Hutchinson's equal (see
    benchmarks/bench_trace.py). ``stderr`` is a standard error for all three.
    ``num_matvecs`` in the result is the number actually spent (XTrace uses an
    even number, and no method sketches more than ``dim`` vectors). Memory:
    Hutchinson O(dim); Hutch++ ~m/3 and XTrace ~2m vectors of length dim.
    """
    if method not in _TRACE_MIN_MATVECS:
        raise LnsgdError(f"method must be one of {sorted(_TRACE_MIN_MATVECS)}; got {method!r}")
    minimum = _TRACE_MIN_MATVECS[method]
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < minimum:
        raise LnsgdError(
            f"num_matvecs must be an integer ≥ {minimum} for method={method!r} ({_TRACE_WHY[method]}); got {num_matvecs!r}"
        )
    op = Operator(matvec, dim, dtype, device)
    gen = resolve_generator(generator)
    if method == "hutchinson":
        return _hutchinson(op, num_matvecs, gen)
    if method == "hutchpp":
        return _hutchpp(op, num_matvecs, gen)
    return _xtrace(op, num_matvecs, gen)


def _hutchinson(op: Operator, m: int, gen) -> TraceEstimate:
    samples = []
    for _ in range(m):  # one probe at a time: memory stays O(dim)
        z = rademacher((op.dim,), gen, op.dtype, op.device)
        samples.append(z @ op(z))
    value, stderr = mean_and_stderr(torch.stack(samples))
    return TraceEstimate(value, stderr, m, "hutchinson")


def _hutchpp(op: Operator, m: int, gen) -> TraceEstimate:
    # Meyer et al. (2021), Algorithm 1: a third of the budget sketches range(A),
    # a third multiplies the orthonormal basis, a third (or more) goes to
    # Hutchinson on the deflated remainder (I−QQᵀ)A(I−QQᵀ).
    k = min(m // 3, op.dim)
    S = gaussian((op.dim, k), gen, op.dtype, op.device)
    Q, _ = torch.linalg.qr(op.columns(S))
    low_rank = float(torch.trace(Q.T @ op.columns(Q)).double())
    samples = []
    for _ in range(m - 2 * k):
        g = rademacher((op.dim,), gen, op.dtype, op.device)
        g = g - Q @ (Q.T @ g)
        samples.append(g @ op(g))
    mean, stderr = mean_and_stderr(torch.stack(samples))
    # The sketch part is exact given Q, so the error is that of the residual mean.
    return TraceEstimate(low_rank + mean, stderr, m, "hutchpp")


def _xtrace(op: Operator, m: int, gen) -> TraceEstimate:
    # Epperly, Tropp & Webber (2024), Algorithm "XTrace". With s test vectors Ω,
    # Y = AΩ = QR. Leaving out ωᵢ, the basis of range(AΩ₋ᵢ) is Q(I − sᵢsᵢᵀ)
    # with sᵢ ∝ R⁻ᵀeᵢ (the direction in range(Q) orthogonal to every y_j, j≠i),
    # so all s leave-one-out Hutch++ estimates come from 2s products:
    #   tᵢ = tr(QᵀAQ) − sᵢᵀHsᵢ + (n−s+1)·uᵢᵀAuᵢ/‖uᵢ‖²,  uᵢ = (I − Pᵢ)ωᵢ,
    # where H = QᵀAQ and Pᵢ = Q(I − sᵢsᵢᵀ)Qᵀ, independent of ωᵢ. The paper's
    # normalization makes the residual probe a point on the sphere of the
    # (n−s+1)-dimensional complement: lower variance, and exact when s = n.
    # We use Rademacher ω: against the paper's Gaussian ω it gave equal error
    # on tiny MLPs and known spectra, 1.3-1.5x lower RMS error on flat or
    # indefinite Hessians (a 2410-parameter digits MLP, a random-init MLP), and
    # a bias (exactly 0 for Gaussian ω) below detection: |bias| < 1e-4
    # relative over 3000 seeds.
    n = op.dim
    s = min(m // 2, n)
    Om = rademacher((n, s), gen, op.dtype, op.device)
    Y = op.columns(Om)
    Q, R = torch.linalg.qr(Y)
    Z = op.columns(Q)
    H = Q.T @ Z
    H = 0.5 * (H + H.T)  # A is symmetric; the HVP is so up to rounding
    R64 = R.double()
    eye = torch.eye(s, dtype=torch.float64, device=R.device)
    try:
        Rinv_T = torch.linalg.solve_triangular(R64.T, eye, upper=False)
    except RuntimeError:
        Rinv_T = torch.linalg.pinv(R64.T)
    if not torch.isfinite(Rinv_T).all():
        # A of rank < s makes R singular; any unit vector in the null directions
        # serves as sᵢ, and the pseudo-inverse picks the least-norm one.
        Rinv_T = torch.linalg.pinv(R64.T)
    S = Rinv_T / Rinv_T.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    S = S.to(op.dtype)
    W = Q.T @ Om
    c = (S * W).sum(0)  # cᵢ = sᵢᵀwᵢ
    coeff = W - S * c  # (I − sᵢsᵢᵀ)wᵢ as columns
    U = Om - Q @ coeff  # uᵢ = (I − Pᵢ)ωᵢ
    AU = Y - Z @ coeff  # Auᵢ without further products
    quad = (U * AU).sum(0).double()
    norm2 = (U * U).sum(0).double().clamp_min(torch.finfo(torch.float64).tiny)
    tr_H = torch.trace(H).double()
    sHs = (S * (H @ S)).sum(0).double()
    estimates = tr_H - sHs + (n - s + 1) * quad / norm2
    value, stderr = mean_and_stderr(estimates)
    return TraceEstimate(value, stderr, 2 * s, "xtrace")


# ---------------------------------------------------------------------------
# tr A = tr G + tr(A − G), with tr G known exactly.
# ---------------------------------------------------------------------------


class SplitTraceEstimate(NamedTuple):
    """tr∇²L = tr G (exact) + tr(∇²L − G) (estimated): ``value`` and its ``stderr``,
    ``trace_gn`` and ``residual`` the two parts, ``num_matvecs`` the residual's products."""

    value: float
    stderr: float
    num_matvecs: int
    method: str
    trace_gn: float
    residual: float


def split_trace(
    residual: Matvec | Tensor,
    dim: int,
    trace_gn: float,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    *,
    method: str = "xtrace",
    dtype: torch.dtype | None = None,
    device=None,
) -> SplitTraceEstimate:
    """tr A = ``trace_gn`` + tr(``residual``), the residual A − G by ``estimate_trace``."""
    rest = estimate_trace(residual, dim, num_matvecs, generator, method=method, dtype=dtype, device=device)
    return SplitTraceEstimate(trace_gn + rest.value, rest.stderr, rest.num_matvecs, "split", trace_gn, rest.value)


def exact_split(trace_gn: float) -> SplitTraceEstimate:
    """tr A = tr G where the residual A − G is known to be traceless (``is_piecewise_linear``):
    no product, stderr 0, method "auto:exact"."""
    return SplitTraceEstimate(trace_gn, 0.0, 0, "auto:exact", trace_gn, 0.0)


def choose_trace(
    hessian: Matvec | Tensor,
    residual: Matvec | Tensor,
    dim: int,
    trace_gn: float,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    *,
    pilot: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
) -> SplitTraceEstimate:
    """tr A for A = G + (A − G) with tr G = ``trace_gn`` known: probe whichever of A or
    the residual A − G is the cheaper to estimate.

    ``pilot`` Rademacher probes (default max(3, m/25)) are spent on both operators
    (2·pilot products); the one whose zᵀ·z has the smaller sample variance then gets
    XTrace with the remaining products, on fresh probes (the pilot only chooses, so the
    estimate stays unbiased). The residual wins near a minimizer of the measured loss,
    where it is small; ∇²L itself wins where the residual term dominates (a clean-loss
    minimizer measured on the flip-noise expected loss). ``method`` says which:
    "auto:split" or "auto:hessian"; ``residual`` is value − trace_gn either way.
    With fewer than 2·pilot + 4 products there is no pilot and the residual is probed.
    """
    check_int("num_matvecs", num_matvecs, 4)
    # A small pilot: it only has to tell apart variances that differ severalfold
    # (where they are close, either choice is fine), and every product it takes is
    # one XTrace does not get. m/10 cost the split half its accuracy on a ReLU CNN.
    k = max(3, num_matvecs // 25) if pilot is None else check_int("pilot", pilot, 2)
    gen = resolve_generator(generator)
    A = Operator(hessian, dim, dtype, device)
    R = Operator(residual, dim, dtype, device)
    chosen, spent, name = R, 0, "auto:split"
    if num_matvecs - 2 * k >= 4:
        on_a, on_r = [], []
        for _ in range(k):
            z = rademacher((dim,), gen, A.dtype, A.device)
            on_a.append(float(z @ A(z)))
            on_r.append(float(z @ R(z)))
        spent = 2 * k
        if torch.tensor(on_a).var() < torch.tensor(on_r).var():
            chosen, name = A, "auto:hessian"
    est = estimate_trace(chosen.fn, dim, num_matvecs - spent, gen, dtype=chosen.dtype, device=chosen.device)
    value = est.value + (trace_gn if chosen is R else 0.0)
    return SplitTraceEstimate(value, est.stderr, spent + est.num_matvecs, name, trace_gn, value - trace_gn)
