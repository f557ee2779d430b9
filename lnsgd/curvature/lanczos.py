"""Lanczos with full reorthogonalization, and what its tridiagonal matrix gives.

``lanczos`` (Lanczos 1950; Golub & Van Loan, Matrix Computations, §10.1) builds an
orthonormal Krylov basis Q and T = QᵀAQ of a symmetric operator, one product per
step; ``ritz_pairs`` reads eigenpair estimates and their residuals off T;
``top_eigenvalues`` are the largest Ritz values; ``spectral_density`` is stochastic
Lanczos quadrature (nodes and weights). T's small eigenproblems are float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lnsgd.curvature.operators import Matvec, Operator, check_int, gaussian, rademacher, resolve_generator
from lnsgd.errors import LnsgdError

# ---------------------------------------------------------------------------
# Lanczos with full reorthogonalization.
# ---------------------------------------------------------------------------


class LanczosResult(NamedTuple):
    """Output of ``lanczos``: Q (dim × m) has orthonormal columns and QᵀAQ = T,
    T tridiagonal with diagonal ``alphas`` (m,) and off-diagonal ``betas[:-1]``.
    ``betas[-1]`` is the norm of the final residual (the coupling to the next,
    unbuilt vector), which bounds the Ritz residuals. alphas/betas are float64."""

    alphas: Tensor
    betas: Tensor
    Q: Tensor


def orthogonalize(w: Tensor, bases: list[Tensor]) -> Tensor:
    """w with its components along the orthonormal columns of every basis in ``bases`` removed."""
    # Classical Gram–Schmidt twice ("twice is enough", Giraud et al. 2005):
    # keeps the basis orthogonal to working precision, which plain Lanczos
    # loses as soon as a Ritz value converges (ghost eigenvalues).
    for _ in range(2):
        for B in bases:
            if B.shape[1]:
                w = w - B @ (B.T @ w)
    return w


def lanczos(
    matvec: Matvec | Tensor,
    dim: int,
    num_iters: int,
    generator: torch.Generator | None = None,
    *,
    start: Tensor | None = None,
    deflate: Tensor | None = None,
    restart_on_breakdown: bool = True,
    stop: Callable[[Tensor, Tensor], bool] | None = None,
    dtype: torch.dtype | None = None,
    device=None,
) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization (Lanczos 1950;
    Golub & Van Loan, Matrix Computations, §10.1). One product per iteration.

    ``start``: the starting vector (default Gaussian). ``deflate``: a dim × k
    orthonormal basis the Krylov space is kept orthogonal to (then this is
    Lanczos on (I−VVᵀ)A(I−VVᵀ)). On breakdown (an invariant subspace found)
    the run either stops, or, with ``restart_on_breakdown``, continues from a
    fresh random vector orthogonal to all previous ones, with a zero coupling in
    T — so Ritz values stay those of QᵀAQ and the first-component weights used
    by quadrature are unaffected. At most ``dim`` iterations are run.
    ``stop(alphas, betas)``, if given, is called after each iteration with the
    coefficients so far (float64; betas as in ``LanczosResult``) and ends the
    run when it returns True.
    """
    op = matvec if isinstance(matvec, Operator) else Operator(matvec, dim, dtype, device)
    num_iters = min(check_int("num_iters", num_iters, 1), op.dim)
    gen = resolve_generator(generator)
    extra = [] if deflate is None else [deflate.to(op.dtype)]
    q = gaussian((op.dim,), gen, op.dtype, op.device) if start is None else start.to(op.device, op.dtype)
    q = orthogonalize(q, extra)
    qnorm = q.norm()
    if not qnorm > 0:
        raise LnsgdError("the Lanczos start vector is zero (after deflation)")
    q = q / qnorm
    Q = torch.empty((op.dim, num_iters), dtype=op.dtype, device=op.device)
    alphas: list[float] = []
    betas: list[float] = []
    anorm = 0.0
    eps = torch.finfo(op.dtype).eps
    for j in range(num_iters):
        Q[:, j] = q
        w = op(q)
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0 and betas[-1] > 0:
            w = w - betas[-1] * Q[:, j - 1]
        w = orthogonalize(w, [Q[:, : j + 1], *extra])
        beta = float(w.norm())
        alphas.append(alpha)
        anorm = max(anorm, abs(alpha) + beta)
        if j + 1 == num_iters or (
            stop is not None
            and stop(torch.tensor(alphas, dtype=torch.float64), torch.tensor([*betas, beta], dtype=torch.float64))
        ):
            betas.append(beta)
            break
        if beta > 100 * eps * max(anorm, 1e-300):
            betas.append(beta)
            q = w / beta
            continue
        # Breakdown: the Krylov space is invariant.
        betas.append(0.0)
        if not restart_on_breakdown:
            break
        q = orthogonalize(gaussian((op.dim,), gen, op.dtype, op.device), [Q[:, : j + 1], *extra])
        if not q.norm() > 0:
            break
        q = q / q.norm()
    m = len(alphas)
    f64 = dict(dtype=torch.float64, device="cpu")
    return LanczosResult(torch.tensor(alphas, **f64), torch.tensor(betas, **f64), Q[:, :m])


def tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    """The symmetric tridiagonal T with diagonal ``alphas`` and off-diagonal ``betas[:len(alphas) − 1]``."""
    T = torch.diag(alphas)
    if alphas.numel() > 1:
        off = betas[: alphas.numel() - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def ritz_pairs(result: LanczosResult) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values (float64, descending), Ritz vectors (dim × m, Q's dtype) and
    residual norms ‖Av − θv‖ = |β_m·(last entry of T's eigenvector)| (float64)."""
    theta, Y = torch.linalg.eigh(tridiagonal(result.alphas, result.betas))
    theta, Y = theta.flip(0), Y.flip(1)
    residuals = (result.betas[-1] * Y[-1, :]).abs()
    vectors = result.Q @ Y.to(device=result.Q.device, dtype=result.Q.dtype)
    return theta, vectors, residuals


def top_eigenvalues(
    matvec: Matvec | Tensor,
    dim: int,
    k: int = 1,
    num_matvecs: int = 30,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device=None,
) -> Tensor:
    """The k largest (algebraic) eigenvalues, largest first, as a float64 tensor.

    Ritz values of a ``num_matvecs``-step Lanczos run from a random start with
    full reorthogonalization (see ``lanczos``). The extreme Ritz values converge
    first and fast (Kaniel–Paige–Saad bounds), far faster than power iteration.
    """
    check_int("k", k, 1)
    check_int("num_matvecs", num_matvecs, 1)
    if k > num_matvecs or k > dim:
        raise LnsgdError(f"k must be ≤ num_matvecs ({num_matvecs}) and ≤ dim ({dim}); got k={k}")
    result = lanczos(matvec, dim, num_matvecs, generator, dtype=dtype, device=device)
    theta, _, _ = ritz_pairs(result)
    return theta[:k]


# ---------------------------------------------------------------------------
# Spectral density by stochastic Lanczos quadrature.
# ---------------------------------------------------------------------------


def spectral_density(
    matvec: Matvec | Tensor,
    dim: int,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    *,
    num_probes: int | None = None,
    dtype: torch.dtype | None = None,
    device=None,
) -> tuple[Tensor, Tensor]:
    """SLQ estimate of the spectral density (Ghorbani, Krishnan & Xiao, ICML 2019;
    Ubaru, Chen & Saad, SIMAX 2017): ``(nodes, weights)``, float64, where each
    probe's Lanczos run contributes its Ritz values with weights τₖ² (squared
    first components of T's eigenvectors), averaged over probes. Weights sum to
    1; multiply by ``dim`` for eigenvalue counts. ``num_probes`` defaults to one
    per 50 products (at least one)."""
    check_int("num_matvecs", num_matvecs, 1)
    if num_probes is None:
        num_probes = max(1, num_matvecs // 50)
    check_int("num_probes", num_probes, 1)
    if num_probes > num_matvecs:
        raise LnsgdError(f"num_probes ({num_probes}) must be ≤ num_matvecs ({num_matvecs})")
    op = Operator(matvec, dim, dtype, device)
    gen = resolve_generator(generator)
    steps = num_matvecs // num_probes
    nodes, weights = [], []
    for _ in range(num_probes):
        z = rademacher((op.dim,), gen, op.dtype, op.device)
        run = lanczos(op, dim, steps, gen, start=z, restart_on_breakdown=False)
        theta, Y = torch.linalg.eigh(tridiagonal(run.alphas, run.betas))
        nodes.append(theta)
        weights.append(Y[0, :] ** 2 / num_probes)
    return torch.cat(nodes), torch.cat(weights)
