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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lnsgd.errors import LnsgdError

Matvec = Callable[[Tensor], Tensor]

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
    "exact_trace_gauss_newton",
    "flatten_params",
    "hessian_matvec",
    "lanczos",
    "mse_loss",
    "residual_matvec",
    "ritz_pairs",
    "smoothed_cross_entropy",
    "spectral_density",
    "split_trace",
    "top_eigenvalues",
    "trace_gauss_newton",
    "trace_hessian",
    "uncompiled",
]


# Losses live in lnsgd.losses (shared with the training loop); re-exported here.
from lnsgd.losses import (  # noqa: E402
    CrossEntropyLoss,
    MSELoss,
    SmoothedCrossEntropy,
    cross_entropy_loss,
    mse_loss,
    smoothed_cross_entropy,
)

# ---------------------------------------------------------------------------
# Small helpers: validation, randomness, operators.
# ---------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LnsgdError(f"{name} must be an integer ≥ {minimum}; got {value!r}")
    return value


def _generator(generator: torch.Generator | None) -> torch.Generator:
    # A fixed default keeps results reproducible; pass your own for fresh draws.
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise LnsgdError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    return generator


def _rademacher(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    signs = torch.randint(0, 2, shape, generator=gen, device=gen.device)
    return (2 * signs - 1).to(device=device, dtype=dtype)


def _gaussian(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).to(device=device, dtype=dtype)


class _Operator:
    """A user matvec (callable or dense tensor) with a known dtype/device and checks."""

    def __init__(self, matvec, dim: int, dtype=None, device=None):
        self.dim = _check_int("dim", dim, 1)
        if isinstance(matvec, Tensor):
            if matvec.shape != (dim, dim):
                raise LnsgdError(f"a dense operator must have shape (dim, dim) = ({dim}, {dim}); got {tuple(matvec.shape)}")
            matrix = matvec
            matvec = lambda v: matrix @ v  # noqa: E731
            dtype = dtype or matrix.dtype
            device = device or matrix.device
        elif not callable(matvec):
            raise LnsgdError(f"matvec must be a callable or a square tensor; got {type(matvec).__name__}")
        self.fn = matvec
        self.dtype = dtype or getattr(matvec, "dtype", None) or torch.float32
        self.device = torch.device(device or getattr(matvec, "device", None) or "cpu")
        if not self.dtype.is_floating_point:
            raise LnsgdError(f"dtype must be a floating-point dtype; got {self.dtype}")

    def __call__(self, v: Tensor) -> Tensor:
        out = self.fn(v)
        if not isinstance(out, Tensor) or out.shape != (self.dim,):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise LnsgdError(f"matvec must return a 1-D tensor of length dim={self.dim}; got {shape}")
        return out.to(dtype=self.dtype, device=self.device)

    def columns(self, X: Tensor) -> Tensor:
        """Apply the operator to each column of X (one matvec per column)."""
        return torch.stack([self(X[:, j]) for j in range(X.shape[1])], dim=1)


# ---------------------------------------------------------------------------
# The Hessian operator of a model's mean loss.
# ---------------------------------------------------------------------------

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (same parameters), else ``model``.

    Compiled graphs (aot_autograd) do not support double backward, which every
    HVP here needs; the eager module computes the same function.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    if not isinstance(model, nn.Module):
        raise LnsgdError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LnsgdError("model has no parameters with requires_grad=True; nothing to differentiate")
    return [n for n, _ in named], [p for _, p in named]


def _refuse_dropout(model: nn.Module) -> None:
    # Eval mode switches dropout off, but a model that carries dropout was trained
    # on a different (random) function; measuring its deterministic twin silently
    # would mislead, and a module that calls F.dropout(training=True) would give
    # nondeterministic HVPs, which break every Krylov method below.
    for name, module in model.named_modules():
        if isinstance(module, _DROPOUT_TYPES) and module.p > 0:
            raise LnsgdError(
                f"model has {type(module).__name__}(p={module.p}) at '{name or '<root>'}': dropout "
                "makes nondeterministic HVPs; set its p=0 (or remove it) before measuring curvature"
            )


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode, then restore each module's own flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_data(inputs: Tensor, targets: Tensor, chunk_size: int) -> int:
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise LnsgdError("inputs and targets must be tensors")
    n = inputs.shape[0] if inputs.ndim else 0
    if n == 0:
        raise LnsgdError("inputs must hold at least one example (first dimension ≥ 1)")
    if targets.shape[0:1] != (n,):
        raise LnsgdError(f"targets must have one entry per input: inputs have {n}, targets have shape {tuple(targets.shape)}")
    _check_int("chunk_size", chunk_size, 1)
    return n


def _to_model(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Floating inputs follow the parameters' dtype (float64 models get float64
    # data); integer inputs and labels keep theirs.
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype, non_blocking=True)
    return t.to(device=device, non_blocking=True)


def _no_autocast(device: torch.device):
    # Curvature is measured in the parameters' own precision, never bf16/fp16.
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def flatten_params(model: nn.Module) -> Tensor:
    """The trainable parameters, detached and concatenated in ``model.parameters()`` order."""
    _, params = _trainable(uncompiled(model))
    return torch.cat([p.detach().reshape(-1) for p in params])


class HessianOperator:
    """v ↦ ∇²L(θ)·v for L the mean of ``loss_fn`` over all ``inputs``.

    Built by ``hessian_matvec``. Each call puts the model in eval mode (BatchNorm
    uses its running statistics), disables autocast, and restores every module's
    train/eval flag afterwards. The input vector may have any dtype/device; the
    product is computed in the parameters' dtype and returned in the input's.
    ``num_matvecs`` counts calls.

    When all examples fit in one chunk, the gradient's graph is built once and
    kept (``cache_graph``): each product is then one backward pass through it,
    about half the cost of rebuilding it. The cache is rebuilt if any parameter
    is modified in place (tracked by version counters), and ``release()`` frees
    it; its memory is what a single product needs at its peak anyway.
    """

    def __init__(self, model, loss_fn, inputs, targets, chunk_size: int = 1024, cache_graph: bool | None = None):
        model = uncompiled(model)
        _, self.params = _trainable(model)
        _refuse_dropout(model)
        self.n = _check_data(inputs, targets, chunk_size)
        if not callable(loss_fn):
            raise LnsgdError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.inputs, self.targets, self.chunk_size = inputs, targets, chunk_size
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_matvecs = 0
        self.cache_graph = (self.n <= chunk_size) if cache_graph is None else bool(cache_graph)
        self._cache: tuple[list[int], list[Tensor | None]] | None = None

    def release(self) -> None:
        """Free the cached gradient graph (if any)."""
        self._cache = None

    def _chunk_grads(self, start: int, stop: int) -> list[Tensor | None]:
        """∇ of this chunk's share of the mean loss, with its graph (for the second backward)."""
        x = _to_model(self.inputs[start:stop], self.dtype, self.device)
        y = _to_model(self.targets[start:stop], self.dtype, self.device)
        # Weight each chunk's mean by its share so the sum is the full-batch mean.
        loss = self.loss_fn(self.model(x), y) * ((stop - start) / self.n)
        return list(torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True))

    def _hvp_chunk(self, grads: list[Tensor | None], vs: list[Tensor], out: list[Tensor], retain: bool) -> None:
        # Double backward: ∇(∇L·v) = ∇²L·v. Works for any norm layer, unlike some
        # forward-mode rules, at ~4 gradients per product (~2 with a cached graph).
        terms = [(g * u).sum() for g, u in zip(grads, vs, strict=True) if g is not None]
        if not terms:
            return
        dot = sum(terms[1:], terms[0])
        if not dot.requires_grad:
            return  # the loss is (at most) linear in θ on this chunk
        hv = torch.autograd.grad(dot, self.params, allow_unused=True, retain_graph=retain)
        for acc, h in zip(out, hv, strict=True):
            if h is not None:
                acc.add_(h.detach())

    def __call__(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor) or v.shape != (self.dim,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise LnsgdError(f"the Hessian operator needs a 1-D tensor of length {self.dim}; got {shape}")
        vs = v.to(device=self.device, dtype=self.dtype).split(self.numels)
        vs = [piece.view(shape) for piece, shape in zip(vs, self.shapes, strict=True)]
        out = [torch.zeros_like(p) for p in self.params]
        with evaluation_mode(self.model), torch.enable_grad(), _no_autocast(self.device):
            if self.cache_graph:
                # In-place updates (optimizer steps, BatchNorm statistics) bump versions.
                versions = [t._version for t in (*self.params, *self.model.buffers())]
                if self._cache is None or self._cache[0] != versions:
                    self._cache = (versions, self._chunk_grads(0, self.n))
                self._hvp_chunk(self._cache[1], vs, out, retain=True)
            else:
                for start in range(0, self.n, self.chunk_size):
                    grads = self._chunk_grads(start, min(start + self.chunk_size, self.n))
                    self._hvp_chunk(grads, vs, out, retain=False)
        self.num_matvecs += 1
        return torch.cat([o.reshape(-1) for o in out]).to(device=v.device, dtype=v.dtype)


def hessian_matvec(
    model, loss_fn, inputs, targets, chunk_size: int = 1024, *, cache_graph: bool | None = None
) -> tuple[HessianOperator, int]:
    """Matrix-free Hessian of the mean loss over ``inputs``: returns ``(matvec, dim)``.

    ``loss_fn(outputs, targets)`` must return the *mean* over its batch. The data
    are processed in chunks of ``chunk_size`` examples (memory is bounded by one
    chunk's double-backward graph), and each chunk's loss is weighted by its
    length / n, so the product is that of the full-batch mean loss. Parameters
    with ``requires_grad`` are flattened in ``model.parameters()`` order.
    Models containing dropout with p > 0 are refused (``LnsgdError``).
    ``cache_graph`` (default: when n ≤ chunk_size) keeps the gradient's graph
    between products; see ``HessianOperator``.
    """
    op = HessianOperator(model, loss_fn, inputs, targets, chunk_size, cache_graph)
    return op, op.dim


def dense_hessian(model, loss_fn, inputs, targets) -> Tensor:
    """The exact dense Hessian (dim × dim) of the mean loss, via ``torch.func``.

    Independent of ``hessian_matvec`` (``functional_call`` + vmapped VJPs on the
    whole batch at once, no chunking), so it serves as the reference in tests.
    Only for tiny models: memory and time grow as dim².
    """
    model = uncompiled(model)
    names, params = _trainable(model)
    _refuse_dropout(model)
    _check_data(inputs, targets, 1)
    dtype, device = params[0].dtype, params[0].device
    x, y = _to_model(inputs, dtype, device), _to_model(targets, dtype, device)
    shapes, numels = [p.shape for p in params], [p.numel() for p in params]

    def loss_of(flat: Tensor) -> Tensor:
        pieces = [t.view(s) for t, s in zip(flat.split(numels), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, pieces, strict=True)), (x,))
        return loss_fn(out, y)

    with evaluation_mode(model), _no_autocast(device):
        # Reverse-over-reverse (jacrev of grad, vmapped over the identity); unlike
        # torch.func.hessian's forward-over-reverse it needs no forward-mode
        # decompositions, whose first load costs seconds.
        return torch.func.jacrev(torch.func.grad(loss_of))(flatten_params(model))


# ---------------------------------------------------------------------------
# Trace: Hutchinson, Hutch++, XTrace.
# ---------------------------------------------------------------------------


class TraceEstimate(NamedTuple):
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


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    samples = samples.double()
    return float(samples.mean()), float(samples.std() / math.sqrt(samples.numel()))


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
    op = _Operator(matvec, dim, dtype, device)
    gen = _generator(generator)
    if method == "hutchinson":
        return _hutchinson(op, num_matvecs, gen)
    if method == "hutchpp":
        return _hutchpp(op, num_matvecs, gen)
    return _xtrace(op, num_matvecs, gen)


def _hutchinson(op: _Operator, m: int, gen) -> TraceEstimate:
    samples = []
    for _ in range(m):  # one probe at a time: memory stays O(dim)
        z = _rademacher((op.dim,), gen, op.dtype, op.device)
        samples.append(z @ op(z))
    value, stderr = _mean_and_stderr(torch.stack(samples))
    return TraceEstimate(value, stderr, m, "hutchinson")


def _hutchpp(op: _Operator, m: int, gen) -> TraceEstimate:
    # Meyer et al. (2021), Algorithm 1: a third of the budget sketches range(A),
    # a third multiplies the orthonormal basis, a third (or more) goes to
    # Hutchinson on the deflated remainder (I−QQᵀ)A(I−QQᵀ).
    k = min(m // 3, op.dim)
    S = _gaussian((op.dim, k), gen, op.dtype, op.device)
    Q, _ = torch.linalg.qr(op.columns(S))
    low_rank = float(torch.trace(Q.T @ op.columns(Q)).double())
    samples = []
    for _ in range(m - 2 * k):
        g = _rademacher((op.dim,), gen, op.dtype, op.device)
        g = g - Q @ (Q.T @ g)
        samples.append(g @ op(g))
    mean, stderr = _mean_and_stderr(torch.stack(samples))
    # The sketch part is exact given Q, so the error is that of the residual mean.
    return TraceEstimate(low_rank + mean, stderr, m, "hutchpp")


def _xtrace(op: _Operator, m: int, gen) -> TraceEstimate:
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
    Om = _rademacher((n, s), gen, op.dtype, op.device)
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
    value, stderr = _mean_and_stderr(estimates)
    return TraceEstimate(value, stderr, 2 * s, "xtrace")


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


def _orthogonalize(w: Tensor, bases: list[Tensor]) -> Tensor:
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
    op = matvec if isinstance(matvec, _Operator) else _Operator(matvec, dim, dtype, device)
    num_iters = min(_check_int("num_iters", num_iters, 1), op.dim)
    gen = _generator(generator)
    extra = [] if deflate is None else [deflate.to(op.dtype)]
    q = _gaussian((op.dim,), gen, op.dtype, op.device) if start is None else start.to(op.device, op.dtype)
    q = _orthogonalize(q, extra)
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
        w = _orthogonalize(w, [Q[:, : j + 1], *extra])
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
        q = _orthogonalize(_gaussian((op.dim,), gen, op.dtype, op.device), [Q[:, : j + 1], *extra])
        if not q.norm() > 0:
            break
        q = q / q.norm()
    m = len(alphas)
    f64 = dict(dtype=torch.float64, device="cpu")
    return LanczosResult(torch.tensor(alphas, **f64), torch.tensor(betas, **f64), Q[:, :m])


def _tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    T = torch.diag(alphas)
    if alphas.numel() > 1:
        off = betas[: alphas.numel() - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def ritz_pairs(result: LanczosResult) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values (float64, descending), Ritz vectors (dim × m, Q's dtype) and
    residual norms ‖Av − θv‖ = |β_m·(last entry of T's eigenvector)| (float64)."""
    theta, Y = torch.linalg.eigh(_tridiagonal(result.alphas, result.betas))
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
    _check_int("k", k, 1)
    _check_int("num_matvecs", num_matvecs, 1)
    if k > num_matvecs or k > dim:
        raise LnsgdError(f"k must be ≤ num_matvecs ({num_matvecs}) and ≤ dim ({dim}); got k={k}")
    result = lanczos(matvec, dim, num_matvecs, generator, dtype=dtype, device=device)
    theta, _, _ = ritz_pairs(result)
    return theta[:k]


# ---------------------------------------------------------------------------
# R(θ) by deflated stochastic Lanczos quadrature.
# ---------------------------------------------------------------------------


class RUndefinedError(LnsgdError):
    """η ≥ 2(1+β)/λ_max: the log in R(θ) has a non-positive argument."""

    def __init__(self, message: str, lambda_max: float, bound: float):
        super().__init__(message)
        self.lambda_max = lambda_max
        self.bound = bound


class REstimate(NamedTuple):
    value: float  # R(θ)
    stderr: float  # standard error of the stochastic (complement) part
    lambda_max: float  # largest Ritz value of the deflation run
    num_matvecs: int  # products actually spent
    num_deflated: int  # eigenpairs treated exactly
    top_eigenvalues: Tensor  # Ritz values of the deflation run, descending (float64)
    eta: float
    momentum: float


def _check_eta_momentum(eta, momentum) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise LnsgdError(f"eta (the learning rate η) must be a finite number > 0; got {eta!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise LnsgdError(f"momentum (β) must be a number in [0, 1); got {momentum!r}")
    # R = −(1+β)/(2η)·Σ log(1 − η/(2(1+β))·λ) = −1/(4c)·Σ log(1 − cλ), c = η/(2(1+β)).
    return eta / (2.0 * (1.0 + momentum))


def _undefined(eta: float, momentum: float, lambda_max: float) -> RUndefinedError:
    bound = 2.0 * (1.0 + momentum) / lambda_max
    return RUndefinedError(
        f"R(θ) is undefined for eta={eta:g}, momentum={momentum:g}: it needs "
        f"eta < 2(1+β)/λ_max = {bound:.6g} (λ_max ≈ {lambda_max:.6g}); use a smaller eta",
        lambda_max,
        bound,
    )


def _R_of(values: Tensor, c: float) -> Tensor:
    # −log(1 − cλ)/(4c), elementwise; → λ/4 as c → 0.
    return -torch.log1p(-c * values) / (4.0 * c)


def R_exact(eigenvalues, eta: float, momentum: float = 0.0) -> float:
    """R(θ) = −(1+β)/(2η)·Σᵢ log(1 − η λᵢ/(2(1+β))) from all Hessian eigenvalues.

    Damian, Ma & Lee (NeurIPS 2021), eq. for R with momentum (β = 0 is plain
    SGD). Raises ``RUndefinedError`` (an ``LnsgdError``) if η ≥ 2(1+β)/λ_max.
    """
    c = _check_eta_momentum(eta, momentum)
    values = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise LnsgdError("eigenvalues must hold at least one value")
    lam_max = float(values.max())
    if c * lam_max >= 1.0:
        raise _undefined(eta, momentum, lam_max)
    return float(_R_of(values, c).sum())


# Budget of estimate_R: 70% on the deflation run, the rest on SLQ probes. After
# deflation the remaining spectrum sits away from the log's singularity at 1/c,
# f is smooth there, and a few quadrature nodes suffice (the first probe picks
# how many); many short probes then cut the variance most. On tiny tanh MLPs
# (dim 279, 16 seeds) shares of 0.6-0.8 were within noise of each other.
_R_DEFLATION_SHARE = 0.7
_R_MIN_MATVECS = 10


def _r_first_run(num_matvecs: int, dim: int) -> int:
    return min(dim, max(1, math.ceil(_R_DEFLATION_SHARE * num_matvecs)))


def _quadrature_settled(c: float, tol: float) -> Callable[[Tensor, Tensor], bool]:
    """A Lanczos stop rule: the quadrature e₁ᵀf(T)e₁ changed by ≤ tol (relative)."""
    previous: list[float] = []

    def stop(alphas: Tensor, betas: Tensor) -> bool:
        nodes, Y = torch.linalg.eigh(_tridiagonal(alphas, betas))
        if c * float(nodes.max()) >= 1.0:
            return True  # undefined; the caller reports it
        value = float((Y[0, :] ** 2 * _R_of(nodes, c)).sum())
        settled = bool(previous) and abs(value - previous[-1]) <= tol * abs(value)
        previous.append(value)
        return settled

    return stop


def _converged(theta: Tensor, residuals: Tensor, tol: float) -> Tensor:
    scale = float(theta.abs().max()) if theta.numel() else 0.0
    return residuals <= tol * max(scale, 1e-300)


def estimate_R(
    matvec: Matvec | Tensor,
    dim: int,
    eta: float,
    momentum: float = 0.0,
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    *,
    lanczos_result: LanczosResult | None = None,
    first_run: int | None = None,
    deflation_tol: float = math.inf,
    slq_tol: float = 1e-4,
    slq_max_steps: int = 30,
    dtype: torch.dtype | None = None,
    device=None,
) -> REstimate:
    """R(θ) = −(1+β)/(2η)·tr log(I − η/(2(1+β))·H) by deflated SLQ.

    R is the implicit regularizer of label-noise SGD (Damian, Ma & Lee, NeurIPS
    2021); β = ``momentum``. It is tr f(H) with f(λ) = −log(1 − cλ)/(4c),
    c = η/(2(1+β)), which is ≈ λ/4 on the bulk and blows up as λ → 1/c, so the
    error of plain stochastic Lanczos quadrature (SLQ; Ubaru, Chen & Saad, SIMAX
    2017) is dominated by the top of the spectrum. Hence deflation (Gambhir,
    Stathopoulos & Orginos, SISC 2017; "Krylov-aware" trace estimation, Chen &
    Hallman, SIMAX 2023):

    1. One Lanczos run from a random start (``first_run`` steps, default 70% of
       ``num_matvecs``; or the given ``lanczos_result``, whose length counts
       toward the budget). Its Ritz pairs with residual ≤
       ``deflation_tol``·max|θ| contribute Σⱼ f(θⱼ) exactly. The top ones
       converge first, which is what removes the singular part of f. The
       default (inf) deflates the whole Krylov space: the neglected coupling
       to the rest is a rank-2 term whose first-order effect on tr f vanishes,
       and on tiny MLP Hessians this halved the error of deflating only pairs
       with residual ≤ 1e-3·max|θ|, at a bias below 1e-4.
    2. SLQ on the rest: Rademacher probes projected off the deflated subspace,
       Lanczos runs reorthogonalized against it, Gauss quadrature
       ‖z‖²·Σₖ τₖ² f(θₖ). The first probe runs until its quadrature changes by
       ≤ ``slq_tol`` (relative; at most ``slq_max_steps``) and fixes the length
       of the others. ``stderr`` is the standard error over probes (the
       deflated part is treated as exact).

    Raises ``RUndefinedError`` (an ``LnsgdError``) as soon as the largest Ritz value
    (a lower bound on λ_max) shows η ≥ 2(1+β)/λ_max, before spending the rest
    of the budget. Negative eigenvalues are fine: log(1 + c|λ|) is defined.
    """
    c = _check_eta_momentum(eta, momentum)
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int) or num_matvecs < _R_MIN_MATVECS:
        raise LnsgdError(
            f"num_matvecs must be an integer ≥ {_R_MIN_MATVECS} for estimate_R "
            f"(a deflation run plus two quadrature probes); got {num_matvecs!r}"
        )
    _check_int("slq_max_steps", slq_max_steps, 1)
    op = _Operator(matvec, dim, dtype, device)
    gen = _generator(generator)
    if lanczos_result is not None:
        first = lanczos_result
        if first.Q.shape[0] != op.dim:
            raise LnsgdError(f"lanczos_result has vectors of length {first.Q.shape[0]}, but dim is {op.dim}")
    else:
        m1 = _r_first_run(num_matvecs, op.dim) if first_run is None else _check_int("first_run", first_run, 1)
        if m1 > num_matvecs - 2 and m1 < op.dim:
            raise LnsgdError(f"first_run ({m1}) must leave ≥ 2 of num_matvecs ({num_matvecs}) for quadrature probes")
        first = lanczos(op, dim, m1, gen)
    used = first.alphas.numel()
    if used > num_matvecs - 2 and used < op.dim:
        raise LnsgdError(
            f"num_matvecs ({num_matvecs}) must exceed the deflation run ({used} steps) by ≥ 2 "
            "to leave products for the quadrature probes"
        )
    theta, vectors, residuals = ritz_pairs(first)
    lam_max = float(theta[0])
    if c * lam_max >= 1.0:
        raise _undefined(eta, momentum, lam_max)

    keep = _converged(theta, residuals, deflation_tol)
    if used >= op.dim:
        keep[:] = True  # the Krylov space is the whole space: T is similar to A
    deflated = _R_of(theta[keep], c).sum()
    V = vectors[:, keep.to(vectors.device)]
    num_deflated = int(keep.sum())

    # SLQ on the complement. Its dimension may be small (tiny models); when
    # nothing is left there is no stochastic part.
    remaining_dim = op.dim - num_deflated
    budget = num_matvecs - used
    samples: list[float] = []
    steps = None  # set by the first probe, then fixed so all probes are alike
    while remaining_dim > 0 and budget > 0:
        if steps is not None and budget < steps and len(samples) >= 2:
            break
        z = _orthogonalize(_rademacher((op.dim,), gen, op.dtype, op.device), [V])
        z_norm2 = float(z.double().pow(2).sum())
        if steps is None:
            # Run the first probe until its Gauss quadrature settles; after deflation
            # f is smooth on what is left and this takes few steps. Keep enough
            # budget for at least one more probe of the same length.
            max_steps = min(remaining_dim, max(1, budget // 2), slq_max_steps)
            run = lanczos(
                op,
                dim,
                max_steps,
                gen,
                start=z,
                deflate=V,
                restart_on_breakdown=False,
                stop=_quadrature_settled(c, slq_tol),
            )
            steps = max(1, run.alphas.numel())
        else:
            run = lanczos(op, dim, min(steps, budget), gen, start=z, deflate=V, restart_on_breakdown=False)
        used += run.alphas.numel()
        budget -= run.alphas.numel()
        nodes, Y = torch.linalg.eigh(_tridiagonal(run.alphas, run.betas))
        if c * float(nodes.max()) >= 1.0:
            # A complement eigenvalue above the deflated top: the first run missed it.
            raise _undefined(eta, momentum, float(nodes.max()))
        samples.append(z_norm2 * float((Y[0, :] ** 2 * _R_of(nodes, c)).sum()))
    if len(samples) >= 2:
        stochastic, stderr = _mean_and_stderr(torch.tensor(samples))
    else:
        stochastic, stderr = (samples[0] if samples else 0.0), (0.0 if remaining_dim == 0 else math.nan)
    return REstimate(
        value=float(deflated) + stochastic,
        stderr=stderr,
        lambda_max=lam_max,
        num_matvecs=used,
        num_deflated=num_deflated,
        top_eigenvalues=theta,
        eta=float(eta),
        momentum=float(momentum),
    )


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
    _check_int("num_matvecs", num_matvecs, 1)
    if num_probes is None:
        num_probes = max(1, num_matvecs // 50)
    _check_int("num_probes", num_probes, 1)
    if num_probes > num_matvecs:
        raise LnsgdError(f"num_probes ({num_probes}) must be ≤ num_matvecs ({num_matvecs})")
    op = _Operator(matvec, dim, dtype, device)
    gen = _generator(generator)
    steps = num_matvecs // num_probes
    nodes, weights = [], []
    for _ in range(num_probes):
        z = _rademacher((op.dim,), gen, op.dtype, op.device)
        run = lanczos(op, dim, steps, gen, start=z, restart_on_breakdown=False)
        theta, Y = torch.linalg.eigh(_tridiagonal(run.alphas, run.betas))
        nodes.append(theta)
        weights.append(Y[0, :] ** 2 / num_probes)
    return torch.cat(nodes), torch.cat(weights)


# ---------------------------------------------------------------------------
# Gauss–Newton trace from vector-Jacobian products.
# ---------------------------------------------------------------------------


def _loss_kind(loss_fn) -> str:
    kind = getattr(loss_fn, "kind", None)
    if kind is None and isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean":
        kind = "cross_entropy"  # label smoothing leaves the logit Hessian unchanged
    if kind not in ("cross_entropy", "mse"):
        raise LnsgdError(
            "tr G (and the split tr∇²L built on it) needs a loss with .kind 'cross_entropy' or 'mse' "
            "(lnsgd.curvature.cross_entropy_loss, smoothed_cross_entropy(p, C) or mse_loss); "
            f"got {loss_fn!r}; for other losses estimate tr∇²L with trace_method='xtrace'"
        )
    return kind


def trace_gauss_newton(
    model,
    loss_fn,
    inputs,
    targets,
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    *,
    per_class: bool | None = None,
    on_sample: Callable[[], None] | None = None,
) -> TraceEstimate:
    """tr G for the Gauss–Newton matrix G = (1/n)·Σᵢ Jᵢᵀ Hᵢ Jᵢ, without second derivatives.

    Jᵢ is the Jacobian of example i's output with respect to θ; Hᵢ the Hessian
    of the loss in the output: diag(pᵢ) − pᵢpᵢᵀ for cross-entropy (also for the
    label-smoothed loss: it does not depend on the target) and I for mse_loss
    (½‖f − y‖²). The kind comes from ``loss_fn.kind`` ("cross_entropy" or
    "mse"; the losses in this module carry it; ``nn.CrossEntropyLoss`` is
    recognized too).

    Only vector-Jacobian products: with vectors sᵢ such that E[sᵢsᵢᵀ] = Hᵢ and
    Rademacher signs rᵢ, one backward pass of Σᵢ rᵢ⟨fᵢ, sᵢ⟩ (s detached) gives
    g = Σᵢ rᵢJᵢᵀsᵢ, and E‖g‖²/n = tr G because the cross terms have mean zero
    (Hutchinson's estimator on JᵀHJ; cf. the sampled Gauss–Newton of Martens &
    Sutskever 2011 and BackPACK, Dangel, Kunstner & Hennig, ICLR 2020).
    - mse: sᵢ Rademacher in the outputs (E[ssᵀ] = I).
    - cross-entropy, ``per_class`` (default when C ≤ 32): Hᵢ = Σ_c p_c (e_c − p)(e_c − p)ᵀ
      is summed exactly, one backward per class with sᵢ = √p_c·(e_c − pᵢ) — C
      backward passes per sample, sharing one forward. On a 3-class MLP this
      had 7x less variance per second than sampling a class.
    - cross-entropy, ``per_class=False``: one backward with sᵢ = pᵢ − e_c,
      c ~ softmax(fᵢ), whose covariance is Hᵢ (the spec'd Monte-Carlo form).
    ‖g‖² is summed per chunk (cross terms between chunks also have mean zero).
    Result: mean over ``num_samples`` with its standard error; ``num_matvecs``
    counts backward passes. ``on_sample()`` is called after each sample.
    """
    kind = _loss_kind(loss_fn)
    _check_int("num_samples", num_samples, 2)
    model = uncompiled(model)
    _, params = _trainable(model)
    _refuse_dropout(model)
    n = _check_data(inputs, targets, chunk_size)
    gen = _generator(generator)
    dtype, device = params[0].dtype, params[0].device
    samples = []
    backward_passes = 0

    def squared_norm_of_vjp(out: Tensor, s: Tensor, retain: bool) -> float:
        nonlocal backward_passes
        m = out.shape[0]
        r = _rademacher((m,), gen, out.dtype, device).view(m, *([1] * (out.ndim - 1)))
        grads = torch.autograd.grad((out * (r * s)).sum(), params, allow_unused=True, retain_graph=retain)
        backward_passes += 1
        return sum(float(gr.double().pow(2).sum()) for gr in grads if gr is not None)

    with evaluation_mode(model), torch.enable_grad(), _no_autocast(device):
        for _ in range(num_samples):
            total = 0.0
            for start in range(0, n, chunk_size):
                out = model(_to_model(inputs[start : min(start + chunk_size, n)], dtype, device))
                if kind == "mse":
                    total += squared_norm_of_vjp(out, _rademacher(tuple(out.shape), gen, out.dtype, device), False)
                    continue
                if out.ndim != 2:
                    raise LnsgdError(f"cross-entropy outputs must be (n, C) logits; got {tuple(out.shape)}")
                probs = out.detach().softmax(1)
                num_classes = out.shape[1]
                if per_class if per_class is not None else num_classes <= 32:
                    for c in range(num_classes):
                        s = -probs
                        s[:, c] += 1.0
                        s = s * probs[:, c : c + 1].sqrt()
                        total += squared_norm_of_vjp(out, s, retain=c < num_classes - 1)
                else:
                    cls = torch.multinomial(probs.to(gen.device), 1, generator=gen).squeeze(1).to(device)
                    total += squared_norm_of_vjp(out, probs - F.one_hot(cls, num_classes).to(probs.dtype), False)
            samples.append(total / n)
            if on_sample is not None:
                on_sample()
    value, stderr = _mean_and_stderr(torch.tensor(samples))
    return TraceEstimate(value, stderr, backward_passes, "gauss_newton_vjp")


# ---------------------------------------------------------------------------
# tr G exactly, and tr∇²L as tr G + tr(∇²L − G).
# ---------------------------------------------------------------------------


def _output_hessians(kind: str, out: Tensor) -> Tensor:
    """Λᵢ = ∇²ℓᵢ in example i's outputs, (b, k, k), for the per-example loss ℓᵢ."""
    flat = out.reshape(out.shape[0], -1)
    if kind == "mse":  # ½‖f − y‖²
        return torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device).expand(flat.shape[0], -1, -1)
    p = flat.softmax(1)  # cross-entropy, label-smoothed or not: diag(p) − ppᵀ
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


_CONV = (nn.Conv1d, nn.Conv2d)
_NORM = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _ghost_input_ndims(m: nn.Module) -> tuple[int, ...]:
    """Input ranks at which module m's per-example gradients are read off its input."""
    if isinstance(m, nn.Linear):
        return (2,)
    if isinstance(m, _CONV):
        if m.groups != 1 or m.padding_mode != "zeros" or (isinstance(m.padding, str) and m.padding != "valid"):
            return ()
        return (3,) if isinstance(m, nn.Conv1d) else (4,)
    if isinstance(m, nn.GroupNorm):
        return (2, 3, 4, 5) if m.affine else ()
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):  # eval mode: affine in the running statistics
        if not m.affine or m.running_mean is None:
            return ()
        return (2, 3) if isinstance(m, nn.BatchNorm1d) else (4,)
    return ()


def _ghost_layers(model: nn.Module, params: list[nn.Parameter], x: Tensor) -> tuple[list[nn.Module], int]:
    """The layers whose per-example gradient norms come from their input and output
    gradient alone ("ghost" layers: ``nn.Linear``, ``nn.Conv1d/2d`` (groups 1, zero
    padding), affine ``nn.GroupNorm``, ``nn.BatchNorm1d/2d`` with running statistics),
    each called once per forward, with all its own parameters trainable and used by
    no other module; and k, the number of outputs per example, from one forward of x[:1]."""
    trainable = {id(p) for p in params}
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    calls: dict[nn.Module, list[int]] = {}
    candidates = []
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if own and _ghost_input_ndims(m) and all(id(p) in trainable and uses[id(p)] == 1 for p in own):
            candidates.append(m)
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.setdefault(mod, []).append(inp[0].ndim)) for m in candidates]
    try:
        with torch.no_grad():
            k = model(x[:1]).numel()
    finally:
        for h in hooks:
            h.remove()
    return [m for m, ndims in calls.items() if len(ndims) == 1 and ndims[0] in _ghost_input_ndims(m)], k


def _conv_unfold(m: nn.Module, a: Tensor) -> Tensor:
    """The patches of a conv layer's input, (b, C_in·kernel, positions)."""
    if isinstance(m, nn.Conv1d):
        pad = 0 if m.padding == "valid" else m.padding[0]
        return F.unfold(a.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]), (0, pad), (1, m.stride[0]))
    return F.unfold(a, m.kernel_size, m.dilation, 0 if m.padding == "valid" else m.padding, m.stride)


def _ghost_context(m: nn.Module, a: Tensor, out: Tensor) -> tuple[str, Tensor]:
    """What layer m's per-example squared gradient norms need of its input a, computed
    once per block and shared by the k output gradients."""
    a = a.detach()
    if isinstance(m, nn.Linear):
        return "linear", a.pow(2).sum(1)
    if isinstance(m, _CONV):
        u = _conv_unfold(m, a)  # per-example weight gradient: G·Uᵀ, G the (C_out, L) output gradient
        positions, patch = u.shape[2], u.shape[1]
        # ‖GUᵀ‖² directly costs L·C_out·patch per example; as ⟨GᵀG, UᵀU⟩ (L×L Grams), L²·(C_out + patch).
        if positions * (m.out_channels + patch) < m.out_channels * patch:
            return "conv-gram", u.transpose(1, 2) @ u
        return "conv", u
    if isinstance(m, nn.GroupNorm):
        return "norm", F.group_norm(a, m.num_groups, eps=m.eps)
    shape = (1, -1) + (1,) * (a.ndim - 2)
    return "norm", (a - m.running_mean.view(shape)) / (m.running_var.view(shape) + m.eps).sqrt()


def _ghost_squared_norms(m: nn.Module, context: tuple[str, Tensor], g: Tensor) -> Tensor:
    """Per-example ‖∂(Σᵢ⟨gᵢ, zᵢ⟩)/∂θ_m‖² over layer m's parameters, (b,), from the
    gradient g of its output z — without forming per-example gradients where a Gram
    is cheaper (the "ghost norm" of Goodfellow 2015; for convolutions, Li et al. 2022)."""
    kind, c = context
    b = g.shape[0]
    bias = 0.0
    if kind == "linear":
        norms = g.pow(2).sum(1) * c
        return norms + g.pow(2).sum(1) if m.bias is not None else norms
    if kind in ("conv", "conv-gram"):
        gs = g.reshape(b, g.shape[1], -1)
        if m.bias is not None:
            bias = gs.sum(2).pow(2).sum(1)
        if kind == "conv":
            return (gs @ c.transpose(1, 2)).pow(2).sum((1, 2)) + bias
        return ((gs.transpose(1, 2) @ gs) * c).sum((1, 2)) + bias
    gs = g.reshape(b, g.shape[1], -1)
    return (gs * c.reshape(gs.shape)).sum(2).pow(2).sum(1) + gs.sum(2).pow(2).sum(1)


def _ghost_elements(model: nn.Module, layers: list[nn.Module], x: Tensor) -> int:
    """Numbers held per example by the ghost computation: each layer's output, its
    copy and gradient, and its context (see _ghost_context), from a forward of x[:1]."""
    sizes: list[int] = []

    def count(mod, inp, out):
        kind, c = _ghost_context(mod, inp[0], out)
        sizes.append(3 * out.numel() + c.numel())

    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes)


def _ghost_trace(
    model: nn.Module, kind: str, names: list[str], params: list[nn.Parameter], x: Tensor, layers: list[nn.Module]
) -> Tensor:
    """Σᵢ tr(Λᵢ JᵢJᵢᵀ) over the examples in ``x`` (Jᵢ = ∂fᵢ/∂θ, Λᵢ the output Hessian).

    With Λᵢ = Σⱼ sᵢⱼsᵢⱼᵀ (mse: sᵢⱼ = eⱼ; cross-entropy: sᵢⱼ = √pᵢⱼ·(eⱼ − pᵢ)) the
    sum is Σⱼ Σᵢ ‖Jᵢᵀsᵢⱼ‖². For each j one batched backward pass of Σᵢ⟨fᵢ, sᵢⱼ⟩ to
    the ghost layers' outputs gives every example's gradient there (examples do not
    interact in eval mode), and the layers' per-example squared norms follow from
    their inputs (_ghost_squared_norms): k backward passes for the block, no
    per-example parameter gradients. The other parameters' share comes from
    per-example Jacobians (``torch.func.vmap`` of ``jacrev``).
    """
    saved: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def keep(mod, inp, out):
        # Downstream gets a copy, so an in-place op after the layer (ReLU(inplace=True),
        # out += identity) cannot change the tensor whose gradient we ask for.
        saved[mod] = (inp[0], out)
        return out.clone()

    hooks = [m.register_forward_hook(keep) for m in layers]
    try:
        with torch.set_grad_enabled(bool(layers)):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    flat = out.reshape(out.shape[0], -1)
    total = torch.zeros((), dtype=torch.float64, device=out.device)
    if layers:
        outputs = [saved[m][1] for m in layers]
        contexts = [_ghost_context(m, *saved[m]) for m in layers]
        saved.clear()
        probs = flat.detach().softmax(1)
        k = flat.shape[1]
        for j in range(k):
            if kind == "mse":
                s = torch.zeros_like(probs)
                s[:, j] = 1.0
            else:
                s = -probs
                s[:, j] += 1.0
                s = s * probs[:, j : j + 1].sqrt()
            grads = torch.autograd.grad((flat * s).sum(), outputs, retain_graph=j < k - 1, allow_unused=True)
            for m, context, g in zip(layers, contexts, grads, strict=True):
                if g is not None:
                    total += _ghost_squared_norms(m, context, g).sum().double()
    in_layers = {id(p) for m in layers for p in m.parameters(recurse=False)}
    rest = [(name, p) for name, p in zip(names, params, strict=True) if id(p) not in in_layers]
    if rest:
        grams = _rest_grams(model, [n for n, _ in rest], [p for _, p in rest], x)
        total += (_output_hessians(kind, flat.detach()) * grams.detach()).sum().double()  # Σᵢ tr(ΛᵢKᵢ): both symmetric
    return total


def _rest_grams(model: nn.Module, names: list[str], params: list[nn.Parameter], x: Tensor) -> Tensor:
    """Σ over ``params`` of their share of JᵢJᵢᵀ, from per-example Jacobians."""

    def output(ps: tuple[Tensor, ...], xi: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (xi.unsqueeze(0),)).reshape(-1)

    # Tied parameters (one tensor under several names): torch.func.functional_call
    # left such a model differentiating stale tensors after a few calls (torch
    # 2.14: the tied layer's share of tr G vanished). They take the loop.
    tied = len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters()))
    if not tied:
        try:
            jacobians = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(tuple(params), x)
        except (RuntimeError, NotImplementedError):
            pass  # a module torch.func cannot batch (in-place ops on captured tensors, custom autograd functions)
        else:
            js = [jac.reshape(jac.shape[0], jac.shape[1], -1) for jac in jacobians]
            return sum(j @ j.transpose(1, 2) for j in js)
    return torch.stack([_jacobian_gram_looped(model, params, xi) for xi in x])


def _jacobian_gram_looped(model: nn.Module, params: list[nn.Parameter], xi: Tensor) -> Tensor:
    out = model(xi.unsqueeze(0)).reshape(-1)
    rows = []
    for c in range(out.numel()):
        grads = torch.autograd.grad(out[c], params, retain_graph=c < out.numel() - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]))
    j = torch.stack(rows)
    return j @ j.T


def exact_trace_gauss_newton(
    model,
    loss_fn,
    inputs,
    targets,
    chunk_size: int = 1024,
    *,
    max_jacobian_elements: int = 2**26,
    on_chunk: Callable[[int, int], None] | None = None,
) -> TraceEstimate:
    """tr G exactly: (1/n)·Σᵢ tr(Λᵢ JᵢJᵢᵀ), G the Gauss–Newton matrix of the mean loss.

    Jᵢ (k × dim) is the Jacobian of example i's k outputs and Λᵢ the Hessian of
    the loss in the outputs: diag(pᵢ) − pᵢpᵢᵀ for cross-entropy (label-smoothed
    or not) and I for ``mse_loss`` (½‖f − y‖²), from ``loss_fn.kind``. Linear,
    convolution and normalization layers (see _ghost_layers) take k batched
    backward passes per block of examples and per-example gradient norms read
    off their inputs (_ghost_trace): about k gradients' work over the examples
    (measured by benchmarks/bench_trace_gn.py). Other parameters take
    per-example reverse-mode Jacobians (``torch.func.vmap`` of ``jacrev``; one
    backward per example and output where a model cannot be vmapped). Memory:
    at most ``max_jacobian_elements`` numbers per block (Jacobians, layer
    outputs and their gradients; activations of the forward itself are not
    counted), and at most ``chunk_size`` examples. No randomness: ``stderr`` is
    0. ``on_chunk(done, n)`` is called after each block. Model in eval mode, as
    for the HVPs.
    """
    kind = _loss_kind(loss_fn)
    model = uncompiled(model)
    names, params = _trainable(model)
    _refuse_dropout(model)
    n = _check_data(inputs, targets, chunk_size)
    _check_int("max_jacobian_elements", max_jacobian_elements, 1)
    dtype, device = params[0].dtype, params[0].device
    dim = sum(p.numel() for p in params)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with evaluation_mode(model), _no_autocast(device):
        first = _to_model(inputs[:1], dtype, device)
        layers, k = _ghost_layers(model, params, first)
        vmapped = dim - sum(p.numel() for m in layers for p in m.parameters(recurse=False))
        per_example = (k * vmapped if vmapped else 0) + (_ghost_elements(model, layers, first) if layers else 0)
        block = max(1, min(chunk_size, max_jacobian_elements // max(per_example, 1)))
        for start in range(0, n, block):
            x = _to_model(inputs[start : min(start + block, n)], dtype, device)
            with torch.enable_grad():  # also under a caller's no_grad
                total += _ghost_trace(model, kind, names, params, x, layers)
            if on_chunk is not None:
                on_chunk(min(start + block, n), n)
    return TraceEstimate(float(total) / n, 0.0, 0, "gauss_newton_exact")


class _ResidualLoss:
    """φ(f) = mean over the chunk of ⟨fᵢ, rᵢ⟩ with rᵢ = ∂ℓᵢ/∂fᵢ frozen (passed as the targets)."""

    def __call__(self, out: Tensor, weights: Tensor) -> Tensor:
        return (out.reshape(out.shape[0], -1) * weights.reshape(weights.shape[0], -1)).sum(1).mean()

    def __repr__(self) -> str:
        return "residual term Σᵢ⟨∂ℓᵢ/∂fᵢ, fᵢ(θ)⟩"


def residual_matvec(model, loss_fn, inputs, targets, chunk_size: int = 1024) -> tuple[HessianOperator, int]:
    """The Hessian's non-Gauss–Newton part ∇²L − G as a matrix-free operator: ``(matvec, dim)``.

    ∇²L = G + (1/n)·Σᵢ Σ_c (∂ℓᵢ/∂f_c)·∇²f_c(xᵢ), and the second term is the
    Hessian of φ(θ) = (1/n)·Σᵢ⟨rᵢ, fᵢ(θ)⟩ with rᵢ = ∂ℓᵢ/∂fᵢ held at the current θ.
    Its products cost what a Hessian's do. It vanishes where the residuals do
    (a loss fit exactly) and its diagonal block of each layer vanishes where the
    network is linear in that layer (ReLU networks without GroupNorm): then its
    trace is exactly 0.
    """
    model = uncompiled(model)
    _, params = _trainable(model)
    n = _check_data(inputs, targets, chunk_size)
    dtype, device = params[0].dtype, params[0].device
    weights = []
    with evaluation_mode(model), _no_autocast(device), torch.enable_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            with torch.no_grad():
                out = model(_to_model(inputs[start:stop], dtype, device))
            out.requires_grad_(True)
            # loss_fn is a batch mean: its gradient is ∂ℓᵢ/∂fᵢ / b.
            (grad,) = torch.autograd.grad(loss_fn(out, _to_model(targets[start:stop], dtype, device)), out)
            weights.append((grad * (stop - start)).detach())
    return hessian_matvec(model, _ResidualLoss(), inputs, torch.cat(weights), chunk_size)


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
    _check_int("num_matvecs", num_matvecs, 4)
    # A small pilot: it only has to tell apart variances that differ severalfold
    # (where they are close, either choice is fine), and every product it takes is
    # one XTrace does not get. m/10 cost the split half its accuracy on a ReLU CNN.
    k = max(3, num_matvecs // 25) if pilot is None else _check_int("pilot", pilot, 2)
    gen = _generator(generator)
    A = _Operator(hessian, dim, dtype, device)
    R = _Operator(residual, dim, dtype, device)
    chosen, spent, name = R, 0, "auto:split"
    if num_matvecs - 2 * k >= 4:
        on_a, on_r = [], []
        for _ in range(k):
            z = _rademacher((dim,), gen, A.dtype, A.device)
            on_a.append(float(z @ A(z)))
            on_r.append(float(z @ R(z)))
        spent = 2 * k
        if torch.tensor(on_a).var() < torch.tensor(on_r).var():
            chosen, name = A, "auto:hessian"
    est = estimate_trace(chosen.fn, dim, num_matvecs - spent, gen, dtype=chosen.dtype, device=chosen.device)
    value = est.value + (trace_gn if chosen is R else 0.0)
    return SplitTraceEstimate(value, est.stderr, spent + est.num_matvecs, name, trace_gn, value - trace_gn)


def trace_hessian(
    model,
    loss_fn,
    inputs,
    targets,
    num_matvecs: int,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    *,
    method: str = "auto",
    residual_method: str = "xtrace",
) -> SplitTraceEstimate:
    """tr∇²L of a model's mean loss, split as tr G + tr(∇²L − G).

    tr G comes exactly from per-example Jacobians (``exact_trace_gauss_newton``).
    ``method="split"``: only the residual ∇²L − G (``residual_matvec``) is
    estimated, by ``estimate_trace`` with ``residual_method`` (XTrace by default:
    the residual of a ReLU network has zero diagonal blocks and a few large
    eigenvalues of both signs, which XTrace deflates) and ``num_matvecs``
    products; the error is that of the residual alone. ``method="auto"``
    (default): ``choose_trace`` spends a pilot on both ∇²L and the residual and
    probes the better one. See benchmarks/bench_trace.py for both. Memory: XTrace
    keeps about 2·``num_matvecs`` vectors of the parameters' size.
    Needs ``loss_fn.kind`` (cross-entropy or mse); for other losses use
    ``estimate_trace(hessian_matvec(...))``.
    """
    if method not in ("auto", "split"):
        raise LnsgdError(f"method must be 'auto' or 'split'; got {method!r}")
    gn = exact_trace_gauss_newton(model, loss_fn, inputs, targets, chunk_size)
    op, dim = residual_matvec(model, loss_fn, inputs, targets, chunk_size)
    if method == "auto":
        hessian, _ = hessian_matvec(model, loss_fn, inputs, targets, chunk_size)
        return choose_trace(hessian, op, dim, gn.value, num_matvecs, generator)
    return split_trace(op, dim, gn.value, num_matvecs, generator, method=residual_method)
