"""Theory lab: Theorem 1 of Damian, Ma & Lee (2021) checked with exact dense Hessians.

The theorem: SGD whose regression labels are re-noised at every step (Algorithm 1,
y + ε with ε uniform on {−σ, +σ}) tracks gradient descent on the regularized loss

    L̃(θ) = L(θ) + λ·R(θ),   R(θ) = −1/(2η)·tr log(I − (η/2)·∇²L(θ)),   λ = ησ²/B,

staying within O(√λ) of it, so it ends near a stationary point of L/λ + R.
With heavy-ball momentum β (b ← βb + g, θ ← θ − ηb) the paper's momentum forms are

    R(θ) = −(1+β)/(2η)·tr log(I − η/(2(1+β))·∇²L(θ)),   λ = ησ²/(B(1−β)),

and the regularized trajectory Φ follows heavy-ball GD on L̃ with the same β.
Both forms are R = −1/(4c)·tr log(I − c·∇²L) with c = η/(2(1+β)), so

    ∂R/∂∇²L = ¼·(I − c·∇²L)⁻¹                                     (1)

and, through the chain rule, ∂R/∂θ = ∇_θ⟨M, ∇²L(θ)⟩ with M = ¼(I − c∇²L)⁻¹ held
fixed: Σ_i r'(λ_i)·u_iᵀ(∂∇²L/∂θ)u_i, a contraction of the third derivative of L.

`run_theory` runs, from one common start, for ``theory.steps`` steps:

- label-noise SGD: minibatches of B = optim.batch_size examples drawn *without
  replacement within a step, independently across steps* from a seeded generator
  (the i.i.d.-minibatch model of the theorem), fresh ±σ (or Gaussian) noise on
  each target, step η = optim.lr, heavy-ball momentum β = optim.momentum;
- plain SGD: the same minibatches, clean targets (the control);
- Φ: full-batch heavy-ball GD on L + λR with the exact R of (1).

Everything is float64 with dense p×p Hessians, so models are limited to
``theory.max_params`` parameters. The two theory-lab models (``quadratic``:
f(x; v) = ⟨v⊙v, x⟩, HaoChen et al. 2021; ``two_layer``: f(x) = aᵀtanh(Wx)/√m)
have their outputs, Jacobians and Hessians written out below in plain torch ops:
torch.func's per-call overhead (≈20 ms for a 40-parameter Hessian on a busy 2-core
CPU) would make the 10⁴ exact Φ steps take minutes. A test checks every explicit
derivative against autograd on the nn.Module.

What "stationarity" measures. ``*/stationarity`` is ‖∇(L/λ + R)‖ as the issue
asks. At a label-noise iterate θ_k = Φ_k + ξ the oscillation ξ ~ √λ across the
valley gives ∇L/λ ≈ ∇²L·ξ/λ ~ 1/√λ, so this number is *large* at θ_k by the
theorem itself; it is small at Φ (which converges to a stationary point of
L/λ + R) and O(1) at plain SGD's iterate. ``*/tangent_stationarity`` is
‖P_T ∇R‖, the gradient of R along the manifold of interpolating solutions
{θ : f(θ; x_i) = y_i}, whose tangent space T is the null space of the output
Jacobian; it does not see the across-valley oscillation and is what tells a
label-noise iterate (near a stationary point of R on the manifold) from a plain
SGD iterate (anywhere on it).

Minibatch sampling noise. λ = ησ²/B counts the label noise only. Away from the
manifold (distance ~√λ, residuals ~√λ) drawing B of n examples adds gradient noise
whose covariance is about `minibatch_noise_ratio` = η(n−B)·tr∇²L/(2B(n−1)) times
the label noise's, independent of σ, so it does not vanish as λ → 0 at fixed η.
Measured: quadratic model, n = 15, η = 0.15, tr∇²L ≈ 38: with B = 5 (ratio ≈ 0.4)
label-noise SGD ran ahead of Φ and ‖θ − Φ‖ settled near 20√λ; with B = n (ratio 0)
it stayed below 4√λ. The shipped recipes use B = n; the summary reports the ratio.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lnsgd.curvature.regularizer import RUndefinedError, eta_bound, regularizer, regularizer_scale, sharpness_bound
from lnsgd.data import make_synthetic
from lnsgd.errors import DivergedError, LnsgdError
from lnsgd.models import DEFAULT_WIDTH, DataSpec, QuadraticModel, TwoLayer
from lnsgd.noise import apply_noise
from lnsgd.recipe import Recipe, lambda_eff, recipe_to_dict, recipe_to_yaml
from lnsgd.runtime import backend_settings, claim_folder, environment_info, refuse_existing, resolve_device, stream_seed
from lnsgd.track import MetricsSink, Progress, read_jsonl, write_atomic
from lnsgd.train.loop import make_model

DTYPE = torch.float64
TRAJECTORIES = ("label_noise", "plain", "phi")
LABELS = {"label_noise": "label-noise SGD", "plain": "plain SGD", "phi": "Φ (GD on L + λR)"}
FIGURE_FILE = "theory.png"
ITERATES_FILE = "iterates.pt"

# --------------------------------------------------------------------------- the regularizer's derivatives (pure)
# R itself, its scale c = η/(2(1+β)), its bound 2(1+β)/η and RUndefinedError live in
# lnsgd.curvature.regularizer; the Φ steps also need ∂R/∂λ and ∂R/∂∇²L.


def regularizer_derivative(eigenvalues: torch.Tensor, eta: float, momentum: float = 0.0) -> torch.Tensor:
    """r'(λ) = 1/(4(1 − cλ)) for each eigenvalue: ∂R/∂λ_i."""
    return 0.25 / (1.0 - regularizer_scale(eta, momentum) * eigenvalues)


def regularizer_grad_matrix(hessian: torch.Tensor, eta: float, momentum: float = 0.0) -> torch.Tensor:
    """∂R/∂∇²L = ¼(I − c∇²L)⁻¹ = U diag(r'(λ)) Uᵀ, by a Cholesky factorization.

    Raises ``RUndefinedError`` when I − c∇²L is not positive definite.
    """
    c = regularizer_scale(eta, momentum)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    chol, info = torch.linalg.cholesky_ex(eye - c * hessian)
    if int(info) != 0:
        lam_max = float(torch.linalg.eigvalsh(hessian)[-1])
        raise RUndefinedError(eta, momentum, lam_max)
    return 0.25 * torch.cholesky_inverse(chol)


# --------------------------------------------------------------------------- explicit models


class ExplicitModel:
    """A theory-lab model as a function of one flat float64 parameter vector θ.

    ``outputs`` f(θ; x) (n,), ``vjp`` Jᵀr, ``jacobian`` J (n, p) and
    ``weighted_hessian`` Σ_i w_i ∇²f_i (p, p), all written as plain torch ops so
    autograd can differentiate them once more (the third derivative in ∇R).
    The layout of θ is that of the nn.Module's parameters, in order.
    """

    name = ""
    num_params = 0

    def outputs(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...
    def vjp(self, theta: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor: ...
    def jacobian(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...
    def weighted_hessian(self, theta: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def contraction_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """∇_θ⟨M, JᵀJ + Σ_i r_i∇²f_i⟩ for a fixed M, r = f − y (n·∇²L is the matrix); by autograd."""
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            J = self.jacobian(th, x)
            nH = J.T @ J + self.weighted_hessian(th, x, self.outputs(th, x) - y)
            (g,) = torch.autograd.grad((M * nH).sum(), th)
        return g


class QuadraticExplicit(ExplicitModel):
    """f(x; v) = ⟨v⊙v, x⟩:  J = 2·x⊙v,  Σ_i w_i∇²f_i = 2·diag(Σ_i w_i x_i)."""

    name = "quadratic"

    def __init__(self, d: int):
        self.num_params = d

    def outputs(self, theta, x):
        return x @ (theta * theta)

    def vjp(self, theta, x, r):
        return 2.0 * (x.T @ r) * theta

    def jacobian(self, theta, x):
        return 2.0 * x * theta

    def weighted_hessian(self, theta, x, w):
        return torch.diag(2.0 * (x.T @ w))

    def contraction_grad(self, theta, x, y, M):
        # ⟨M, JᵀJ⟩ = 4Σ_i (x_i⊙v)ᵀM(x_i⊙v)  →  8Σ_i x_i⊙(M(x_i⊙v));
        # ⟨M, 2diag(Xᵀr)⟩ = 2(Xd)ᵀr, d = diag M, ∂r_i/∂v = 2x_i⊙v  →  4(Xᵀ(Xd))⊙v.
        # Written out: a tenth of the Python-level ops of the autograd version.
        xv = x * theta
        return 8.0 * (x * (xv @ M)).sum(0) + 4.0 * (x.T @ (x @ torch.diagonal(M))) * theta


class TwoLayerExplicit(ExplicitModel):
    """f(x) = s·aᵀ tanh(Wx), s = 1/√m; θ = (W row-major (m, d), a (m)) as in models.TwoLayer.

    With z = Wx, t = tanh z, t' = 1 − t², t'' = −2tt':
      ∂f/∂W_jk = s a_j t'_j x_k,   ∂f/∂a_j = s t_j,
      ∂²f/∂W_j∂W_l = δ_jl s a_j t''_j x xᵀ,   ∂²f/∂W_jk∂a_l = δ_jl s t'_j x_k,   ∂²f/∂a∂a = 0.
    """

    name = "two_layer"

    def __init__(self, d: int, width: int):
        self.d, self.m = d, width
        self.s = width**-0.5
        self.num_params = width * d + width

    def _split(self, theta):
        md = self.m * self.d
        return theta[:md].view(self.m, self.d), theta[md:]

    def outputs(self, theta, x):
        W, a = self._split(theta)
        return self.s * (torch.tanh(x @ W.T) @ a)

    def vjp(self, theta, x, r):
        W, a = self._split(theta)
        t = torch.tanh(x @ W.T)
        gW = self.s * ((r[:, None] * (1 - t * t) * a).T @ x)
        ga = self.s * (t.T @ r)
        return torch.cat([gW.reshape(-1), ga])

    def jacobian(self, theta, x):
        W, a = self._split(theta)
        t = torch.tanh(x @ W.T)
        JW = (self.s * a * (1 - t * t))[:, :, None] * x[:, None, :]
        return torch.cat([JW.reshape(len(x), -1), self.s * t], dim=1)

    def weighted_hessian(self, theta, x, w):
        W, a = self._split(theta)
        m, d = self.m, self.d
        t = torch.tanh(x @ W.T)
        t1 = 1 - t * t
        t2 = -2 * t * t1
        eye = torch.eye(m, dtype=theta.dtype, device=theta.device)
        blocks = ((w[:, None] * t2).T[:, None, :] * x.T) @ x * (self.s * a)[:, None, None]  # (m, d, d)
        WW = (blocks[:, :, None, :] * eye[:, None, :, None]).reshape(m * d, m * d)
        C = self.s * ((w[:, None] * t1).T @ x)  # (m, d)
        Wa = (C[:, :, None] * eye[:, None, :]).reshape(m * d, m)
        top = torch.cat([WW, Wa], dim=1)
        bottom = torch.cat([Wa.T, torch.zeros(m, m, dtype=theta.dtype, device=theta.device)], dim=1)
        return torch.cat([top, bottom], dim=0)

    def contraction_grad(self, theta, x, y, M):
        # ∇⟨M, JᵀJ⟩ = 2Σ_i ∇²f_i (M J_iᵀ);  ∇⟨M, Σ r_i∇²f_i⟩ = Σ_i J_i⟨M, ∇²f_i⟩ + Σ_i r_i ∇⟨M, ∇²f_i⟩.
        # With Q_ij = x_iᵀ M[W_j, W_j] x_i and P_ij = M[W_j, a_j]·x_i (the only blocks ∇²f_i touches):
        #   ⟨M, ∇²f_i⟩ = s Σ_j (a_j t''_ij Q_ij + 2 t'_ij P_ij),
        #   ∂/∂W_j = s(a_j t'''_ij Q_ij + 2 t''_ij P_ij) x_i,   ∂/∂a_j = s t''_ij Q_ij.
        W, a = self._split(theta)
        m, d, s = self.m, self.d, self.s
        n = len(x)
        t = torch.tanh(x @ W.T)
        t1 = 1 - t * t
        t2 = -2 * t * t1
        t3 = -2 * t1 * t1 + 4 * t * t * t1
        r = s * (t @ a) - y
        J = torch.cat([((s * a * t1)[:, :, None] * x[:, None, :]).reshape(n, -1), s * t], dim=1)
        U = J @ M  # row i: (M J_iᵀ)ᵀ
        UW, ua = U[:, : m * d].reshape(n, m, d), U[:, m * d :]
        xU = (UW * x[:, None, :]).sum(-1)
        M_ww = torch.diagonal(M[: m * d, : m * d].reshape(m, d, m, d), dim1=0, dim2=2)  # (d, d, m)
        M_wa = torch.diagonal(M[: m * d, m * d :].reshape(m, d, m), dim1=0, dim2=2)  # (d, m)
        Q = ((x @ M_ww.reshape(d, d * m)).reshape(n, d, m) * x[:, :, None]).sum(1)
        P = x @ M_wa
        q = s * (a * t2 * Q + 2 * t1 * P).sum(1)  # ⟨M, ∇²f_i⟩
        coef_W = 2 * (a * t2 * xU + t1 * ua) + r[:, None] * (a * t3 * Q + 2 * t2 * P)
        gW = s * (coef_W.T @ x) + (J[:, : m * d].T @ q).reshape(m, d)
        ga = s * (2 * t1 * xU + r[:, None] * t2 * Q).sum(0) + J[:, m * d :].T @ q
        return torch.cat([gW.reshape(-1), ga])


def explicit_model(module: nn.Module) -> ExplicitModel:
    """The explicit form of a theory-lab nn.Module (quadratic or two_layer with one output)."""
    if isinstance(module, QuadraticModel):
        return QuadraticExplicit(module.v.numel())
    if isinstance(module, TwoLayer):
        if module.out.weight.shape[0] != 1:
            raise LnsgdError("lnsgd theory needs a scalar regression target (data.name=synthetic gives one)")
        return TwoLayerExplicit(module.hidden.weight.shape[1], module.hidden.weight.shape[0])
    raise LnsgdError(f"lnsgd theory supports model.name=quadratic or two_layer, not {type(module).__name__}")


def flat_parameters(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).to(DTYPE)


# --------------------------------------------------------------------------- the loss and its derivatives


class Problem:
    """L(θ) = mean over the n training examples of ½(f(θ; x_i) − y_i)², with exact derivatives."""

    def __init__(self, model: ExplicitModel, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.n = len(x)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        r = self.model.outputs(theta, self.x) - self.y
        return 0.5 * (r * r).mean()

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.model.vjp(theta, self.x, self.model.outputs(theta, self.x) - self.y) / self.n

    def minibatch_grad(self, theta: torch.Tensor, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """∇ of mean over the batch of ½(f − targets)²."""
        return self.model.vjp(theta, x, self.model.outputs(theta, x) - targets) / len(x)

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """∇²L = (JᵀJ + Σ_i r_i ∇²f_i)/n (differentiable in θ)."""
        J = self.model.jacobian(theta, self.x)
        r = self.model.outputs(theta, self.x) - self.y
        return (J.T @ J + self.model.weighted_hessian(theta, self.x, r)) / self.n

    def regularizer(self, theta: torch.Tensor, eta: float, momentum: float = 0.0) -> torch.Tensor:
        """R(θ) (NaN where undefined)."""
        return regularizer(torch.linalg.eigvalsh(self.hessian(theta)), eta, momentum)

    def regularizer_grad(self, theta: torch.Tensor, eta: float, momentum: float = 0.0) -> torch.Tensor:
        """∇R(θ) = ∇_θ⟨M, ∇²L(θ)⟩ with M = ¼(I − c∇²L)⁻¹ fixed (eq. 1); raises RUndefinedError."""
        return self.regularized_grad(theta, 0.0, eta, momentum, with_loss=False)

    def regularized_grad(self, theta: torch.Tensor, lam: float, eta: float, momentum: float = 0.0,
                         with_loss: bool = True) -> torch.Tensor:  # fmt: skip
        """∇(L + λR)(θ) (or ∇R alone when ``with_loss`` is false), ∇R by eq. (1)."""
        M = regularizer_grad_matrix(self.hessian(theta), eta, momentum)
        grad_R = self.model.contraction_grad(theta, self.x, self.y, M) / self.n
        return self.grad(theta) + lam * grad_R if with_loss else grad_R

    def tangent_projection(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """v minus its component in the row space of the output Jacobian J (n × p).

        The row space is the normal space of {θ : f(θ; x_i) = y_i ∀i}; what remains is
        the part of v along the manifold of interpolating solutions.
        """
        J = self.model.jacobian(theta, self.x)
        _, s, Vh = torch.linalg.svd(J, full_matrices=False)
        keep = s > s.max() * max(J.shape) * torch.finfo(J.dtype).eps
        Vr = Vh[keep]
        return v - Vr.T @ (Vr @ v)


def measure(problem: Problem, theta: torch.Tensor, lam: float, eta: float, momentum: float,
            w_star: torch.Tensor | None) -> dict:  # fmt: skip
    """Every logged quantity at one point θ (NaN for R-terms where R is undefined)."""
    loss = float(problem.loss(theta))
    evals, evecs = torch.linalg.eigh(problem.hessian(theta))
    R = float(regularizer(evals, eta, momentum))
    out = {"loss": loss, "R": R, "trace_hessian": float(evals.sum()), "lambda_max": float(evals[-1])}
    if math.isfinite(R):
        # ∂R/∂∇²L from the eigen-decomposition here (the Φ steps use the Cholesky form of eq. 1).
        M = (evecs * regularizer_derivative(evals, eta, momentum)) @ evecs.T  # U diag(r'(λ)) Uᵀ
        grad_R = problem.model.contraction_grad(theta, problem.x, problem.y, M) / problem.n
        out["stationarity"] = float((problem.grad(theta) / lam + grad_R).norm())
        out["tangent_stationarity"] = float(problem.tangent_projection(theta, grad_R).norm())
    else:
        out["stationarity"] = out["tangent_stationarity"] = math.nan
    if w_star is not None:
        out["recovery_error"] = float((theta * theta - w_star).norm())
    return out


# --------------------------------------------------------------------------- recipe checks


def check_theory_recipe(recipe: Recipe) -> None:
    """Refuse recipes the theory lab cannot run, each with a one-line fix."""
    if recipe.data.name != "synthetic" or recipe.loss != "mse":
        raise LnsgdError(
            f"lnsgd theory needs regression data: data.name=synthetic and loss=mse (got data.name={recipe.data.name}, "
            f"loss={recipe.loss}); Theorem 1 is about ±σ label noise on squared error"
        )
    if recipe.noise.kind not in ("sign", "gaussian"):
        raise LnsgdError(
            f"lnsgd theory needs noise.kind=sign or gaussian with noise.sigma > 0 (got noise.kind={recipe.noise.kind}); "
            "the plain-SGD control is run alongside automatically"
        )
    if recipe.model.name not in ("quadratic", "two_layer"):
        raise LnsgdError(f"lnsgd theory supports model.name=quadratic or two_layer (got {recipe.model.name})")
    o = recipe.optim
    if o.full_batch:
        raise LnsgdError("lnsgd theory runs minibatch SGD with optim.batch_size; set optim.full_batch=false")
    if o.weight_decay != 0:
        raise LnsgdError("lnsgd theory studies L = ½·mean (f − y)² alone; set optim.weight_decay=0")
    if o.schedule.kind != "constant" or o.schedule.warmup_epochs != 0:
        raise LnsgdError("lnsgd theory needs a fixed step η (R depends on it); set optim.schedule.kind=constant, warmup_epochs=0")
    n = recipe.data.synthetic.n
    if recipe.data.train_size not in (None, n):
        raise LnsgdError(f"lnsgd theory uses all data.synthetic.n={n} examples; set data.synthetic.n instead of data.train_size")
    if o.batch_size > n:
        raise LnsgdError(f"optim.batch_size={o.batch_size} exceeds the {n} training examples; lower it or raise data.synthetic.n")


def _check_size(num_params: int, recipe: Recipe) -> None:
    limit = recipe.theory.max_params
    if num_params > limit:
        raise LnsgdError(
            f"model has {num_params} parameters, more than theory.max_params={limit} (dense float64 Hessians, p×p); "
            "shrink data.synthetic.d or model.width, or raise theory.max_params; for large models use `lnsgd measure-sharpness`"
        )


# --------------------------------------------------------------------------- the run


def _fit(problem: Problem, theta: torch.Tensor, steps: int, lr: float, progress: Progress) -> torch.Tensor:
    """Full-batch GD on the clean loss: reach an interpolating start for the three trajectories."""
    if steps == 0:
        return theta
    progress.start(steps, 0, "theory: fit", unit="steps")
    report = max(steps // 50, 1)
    for k in range(steps):
        theta = theta - lr * problem.grad(theta)
        if (k + 1) % report == 0 or k + 1 == steps:
            loss = float(problem.loss(theta))
            if not math.isfinite(loss):
                progress.stop()
                raise DivergedError(f"the fit phase diverged by step {k + 1}; lower theory.fit_lr (it was {lr})")
            progress.advance(k + 1, {"loss": loss})
    progress.stop()
    return theta


def _draws(recipe: Recipe, y: torch.Tensor, batch_gen: torch.Generator, noise_gen: torch.Generator, count: int):
    """Minibatch indices for ``count`` steps (B distinct examples per step) and their noised targets."""
    n, B = len(y), recipe.optim.batch_size
    idx = torch.rand(count, n, generator=batch_gen, dtype=DTYPE, device=y.device).argsort(dim=1)[:, :B]
    clean = y[idx]
    return idx, clean, apply_noise(recipe.noise, clean, 1, noise_gen)


def run_theory(recipe: Recipe, run_dir: Path, *, force: bool = False, progress: Progress | None = None) -> dict:
    """Run the three trajectories of the theory lab into ``run_dir``; return the summary.

    Writes recipe.yaml, metrics.jsonl (one row every theory.eval_every steps),
    theory.png, iterates.pt (start and final θ of each trajectory) and summary.json.
    """
    run_dir = Path(run_dir)
    progress = progress or Progress()
    check_theory_recipe(recipe)
    device = resolve_device(recipe.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # p ≤ a few hundred: intra-op threads cost more than they save (measured 4× slower Φ steps
        # with 2 threads on a busy 2-core machine); restored on the way out.
        torch.set_num_threads(1)
    try:
        with backend_settings(recipe, device):
            return _run(recipe, run_dir, device, force, progress)
    finally:
        torch.set_num_threads(threads)


def _run(recipe: Recipe, run_dir: Path, device: torch.device, force: bool, progress: Progress) -> dict:
    cfg = recipe.data.synthetic
    width = recipe.model.width or DEFAULT_WIDTH[recipe.model.name]
    _check_size(cfg.d if recipe.model.name == "quadratic" else width * cfg.d + width, recipe)  # before any allocation
    refuse_existing(run_dir, force=force)
    x, y, _, _, teacher = make_synthetic(cfg)
    x, y = x.to(device), y[:, 0].to(device)
    w_star = teacher.to(device) if recipe.model.name == "quadratic" and cfg.teacher == "sparse_linear" else None
    module = make_model(recipe, DataSpec((cfg.d,), 1, "regression"), torch.device("cpu"))
    model = explicit_model(module)
    _check_size(model.num_params, recipe)
    problem = Problem(model, x, y)

    eta, beta = recipe.optim.lr, recipe.optim.momentum
    lam = lambda_eff(recipe, len(y))
    theta0 = flat_parameters(module).to(device)
    started = time.perf_counter()
    theta0 = _fit(problem, theta0, recipe.theory.fit_steps, recipe.theory.fit_lr or eta, progress)
    lam_max0 = float(torch.linalg.eigvalsh(problem.hessian(theta0))[-1])
    bound = sharpness_bound(eta, beta)
    if lam_max0 >= bound:
        raise LnsgdError(
            f"optim.lr={eta:g} is too large at the start: λ_max(∇²L) = {lam_max0:.4g} ≥ 2(1+β)/η = {bound:.4g}, where "
            f"R = −(1+β)/(2η)·tr log(I − η/(2(1+β))∇²L) is undefined; lower optim.lr below {eta_bound(lam_max0, beta):.4g}"
        )
    # Is the start interpolating at the scale of the experiment? If GD on L alone still moves
    # faster than the regularizer pulls, plain SGD drifts too and the comparison blurs.
    grad_L0 = float(problem.grad(theta0).norm())
    grad_R0 = float(problem.regularizer_grad(theta0, eta, beta).norm())
    if grad_L0 > 0.1 * lam * grad_R0:
        fix = "raise theory.fit_steps or theory.fit_lr" if recipe.theory.fit_steps else "set theory.fit_steps (and theory.fit_lr)"
        warnings.warn(
            f"the trajectories start at L = {float(problem.loss(theta0)):.3g} with ‖∇L‖ = {grad_L0:.3g} > 0.1·λ‖∇R‖ = "
            f"{0.1 * lam * grad_R0:.3g}: not an interpolating start, so plain SGD will keep moving; {fix}",
            RuntimeWarning,
            stacklevel=3,
        )

    claim_folder(run_dir, force=force)  # the theory lab writes no checkpoints
    write_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    sink = MetricsSink(run_dir, recipe.log.wandb, recipe.name, recipe_to_dict(recipe))

    batch_gen = torch.Generator(device=device).manual_seed(stream_seed(recipe.seed, "theory-batches"))
    noise_gen = torch.Generator(device=device).manual_seed(stream_seed(recipe.seed, "theory-noise"))
    theta = {t: theta0.clone() for t in TRAJECTORIES}
    velocity = {t: torch.zeros_like(theta0) for t in TRAJECTORIES}  # heavy-ball buffers b ← βb + g; θ ← θ − ηb
    steps, every = recipe.theory.steps, recipe.theory.eval_every
    sqrt_lam = math.sqrt(lam)

    def row_at(step: int) -> dict:
        for t in ("label_noise", "plain"):
            if not bool(torch.isfinite(theta[t]).all()) or not math.isfinite(float(problem.loss(theta[t]))):
                raise DivergedError(f"{LABELS[t]} diverged by step {step}; lower optim.lr or raise optim.batch_size")
        row: dict = {"step": step, "time_s": round(time.perf_counter() - started, 3), "lr": eta, "lambda": lam,
                     "lambda_eff": lam}  # fmt: skip
        for t in TRAJECTORIES:
            for k, v in measure(problem, theta[t], lam, eta, beta, w_star).items():
                row[f"{t}/{k}"] = v
        row["coupling/distance"] = float((theta["label_noise"] - theta["phi"]).norm())
        row["coupling/plain_distance"] = float((theta["plain"] - theta["phi"]).norm())
        row["coupling/sqrt_lambda"] = sqrt_lam
        return row

    chunk = 1000
    rows: list[dict] = []
    try:
        progress.start(steps, 0, "theory", unit="steps")
        rows.append(row_at(0))
        sink.log(rows[-1])
        progress.advance(0, _progress_info(rows[-1], sqrt_lam))
        for start in range(0, steps, chunk):
            count = min(chunk, steps - start)
            idx, clean, noisy = _draws(recipe, y, batch_gen, noise_gen, count)
            for j in range(count):
                xb = x[idx[j]]
                grads = {
                    "label_noise": problem.minibatch_grad(theta["label_noise"], xb, noisy[j]),
                    "plain": problem.minibatch_grad(theta["plain"], xb, clean[j]),
                }
                try:
                    grads["phi"] = problem.regularized_grad(theta["phi"], lam, eta, beta)
                except RUndefinedError as e:
                    raise LnsgdError(
                        f"Φ (GD on L + λR) reached λ_max(∇²L) = {e.lambda_max:.4g} ≥ 2(1+β)/η = {bound:.4g} at step "
                        f"{start + j}, where R is undefined; lower optim.lr, or lower λ = {lam:.3g} "
                        "(noise.sigma, optim.batch_size)"
                    ) from None
                for t in TRAJECTORIES:
                    velocity[t] = beta * velocity[t] + grads[t] if beta else grads[t]
                    theta[t] = theta[t] - eta * velocity[t]
                step = start + j + 1
                if step % every == 0 or step == steps:
                    rows.append(row_at(step))
                    sink.log(rows[-1])
                    progress.advance(step, _progress_info(rows[-1], sqrt_lam))
    finally:
        progress.stop()
        sink.close()

    torch.save({"start": theta0.cpu(), **{t: theta[t].cpu() for t in TRAJECTORIES},
                **({"w_star": w_star.cpu()} if w_star is not None else {})}, run_dir / ITERATES_FILE)  # fmt: skip
    summary = _summary(recipe, run_dir, rows, lam, model, time.perf_counter() - started, device)
    summary["start"] = {k.removeprefix("label_noise/"): v for k, v in rows[0].items() if k.startswith("label_noise/")}
    summary["fit"] = {"steps": recipe.theory.fit_steps, "lr": recipe.theory.fit_lr or eta, "loss": rows[0]["label_noise/loss"],
                      "grad_norm": grad_L0}  # fmt: skip
    trace0 = rows[0]["label_noise/trace_hessian"]
    summary["minibatch_noise_ratio"] = minibatch_noise_ratio(eta, recipe.optim.batch_size, len(y), trace0)
    write_atomic(run_dir / "summary.json", json.dumps(_json_safe(summary), indent=2, default=str))
    write_figure(run_dir)
    return summary


def minibatch_noise_ratio(eta: float, batch_size: int, n: int, trace_hessian: float) -> float:
    """Covariance of minibatch-sampling noise relative to the label noise's, near the manifold.

    At distance ~√λ from the interpolating manifold the residuals r_i are ~√λ, and the
    sampling noise of the minibatch gradient (B of n without replacement) has covariance
    ≈ (n−B)/(B(n−1))·E[r²]·G with E[r²] ≈ λ·tr∇²L/2, against σ²/B·G for the label noise:
    a ratio η(n−B)·tr∇²L/(2B(n−1)), independent of σ. Theorem 1's λ = ησ²/B leaves this
    noise out, so it should be ≪ 1 (B close to n) for θ to track Φ; 0 at B = n.
    """
    return eta * (n - batch_size) * trace_hessian / (2 * batch_size * max(n - 1, 1))


def _json_safe(value):
    """NaN/inf (R undefined somewhere) become null, as in metrics.jsonl."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _progress_info(row: dict, sqrt_lam: float) -> dict:
    info = {"dist/√λ": row["coupling/distance"] / sqrt_lam}
    if "label_noise/recovery_error" in row:
        info["rec"] = row["label_noise/recovery_error"]
        info["rec plain"] = row["plain/recovery_error"]
    else:
        info["R"] = row["label_noise/R"]
        info["R plain"] = row["plain/R"]
    return info


def _summary(recipe: Recipe, run_dir: Path, rows: list[dict], lam: float, model: ExplicitModel, wall: float,
             device: torch.device) -> dict:  # fmt: skip
    last = rows[-1]
    keys = ("loss", "R", "stationarity", "tangent_stationarity", "recovery_error", "trace_hessian", "lambda_max")
    dist = [r["coupling/distance"] for r in rows]
    sqrt_lam = math.sqrt(lam)
    return {
        "name": recipe.name, "command": "theory", "run_dir": str(run_dir), "model": model.name,
        "params": model.num_params, "n": recipe.data.synthetic.n, "steps": recipe.theory.steps,
        "eta": recipe.optim.lr, "momentum": recipe.optim.momentum, "batch_size": recipe.optim.batch_size,
        "noise": recipe.noise.kind, "sigma": recipe.noise.sigma, "lambda": lam,
        **{t: {k: last[f"{t}/{k}"] for k in keys if f"{t}/{k}" in last} for t in TRAJECTORIES},
        "coupling": {
            "max_distance": max(dist), "final_distance": dist[-1], "sqrt_lambda": sqrt_lam,
            "max_distance_over_sqrt_lambda": max(dist) / sqrt_lam,
            "plain_final_distance": last["coupling/plain_distance"],
        },
        "wall_time_s": round(wall, 3), "environment": environment_info(device),
    }  # fmt: skip


# --------------------------------------------------------------------------- outputs


def write_figure(run_dir: Path) -> Path:
    """theory.png from the run folder's metrics.jsonl (matplotlib Agg; no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter, NullFormatter

    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    steps = [r["step"] for r in rows]

    def series(key: str) -> list[float]:
        # None (R undefined) and exact zeros (the common start, on log axes) are left out
        return [math.nan if not r.get(key) else r[key] for r in rows]

    colors = {"label_noise": "tab:blue", "plain": "tab:orange", "phi": "tab:green"}
    fig = Figure(figsize=(12, 8.5))
    # fixed margins: constrained layout cost seconds per figure on a busy CPU
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.91, wspace=0.18, hspace=0.28)
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2)
    sqrt_lam = rows[0]["coupling/sqrt_lambda"]

    a = ax[0, 0]
    a.plot(steps, series("coupling/distance"), color=colors["label_noise"], label="‖θ − Φ‖ (label noise)")
    a.plot(steps, series("coupling/plain_distance"), color=colors["plain"], label="‖θ_plain − Φ‖")
    a.axhline(sqrt_lam, color="k", ls="--", lw=1, label="√λ")
    a.set(title="distance to the regularized trajectory Φ", xlabel="step", yscale="log")
    a.legend()

    a = ax[0, 1]
    for t in TRAJECTORIES:
        a.plot(steps, series(f"{t}/stationarity"), color=colors[t], label=f"‖∇(L/λ + R)‖, {LABELS[t]}")
        a.plot(steps, series(f"{t}/tangent_stationarity"), color=colors[t], ls=":", label=f"‖P_T ∇R‖, {LABELS[t]}")
    a.set(title="stationarity of L/λ + R (dotted: along the manifold)", xlabel="step", yscale="log")
    a.legend(fontsize=7, loc="center right")

    a = ax[1, 0]
    if "label_noise/recovery_error" in rows[0]:
        for t in TRAJECTORIES:
            a.plot(steps, series(f"{t}/recovery_error"), color=colors[t], label=LABELS[t])
        a.set(title="recovery error ‖v⊙v − w*‖", xlabel="step", yscale="log")
    else:
        for t in TRAJECTORIES:
            a.plot(steps, series(f"{t}/loss"), color=colors[t], label=LABELS[t])
        a.set(title="training loss L (clean)", xlabel="step", yscale="log")
    a.legend()

    a = ax[1, 1]
    for t in TRAJECTORIES:
        a.plot(steps, series(f"{t}/R"), color=colors[t], label=LABELS[t])
    a.set(title="label noise against plain SGD: R(θ)", xlabel="step")
    a.legend()

    for a in ax.flat:
        if a.get_yscale() == "log":  # plain-text tick labels: mathtext ones cost a second to typeset
            a.yaxis.set_major_formatter(LogFormatter())
            a.yaxis.set_minor_formatter(NullFormatter())
    lam = rows[0]["lambda"]
    fig.suptitle(f"Theorem 1 (Damian, Ma & Lee 2021): λ = {lam:.3g}, √λ = {sqrt_lam:.3g}")
    path = Path(run_dir) / FIGURE_FILE
    fig.savefig(path, dpi=110)
    return path


def summary_table(summary: dict):
    """A rich Table of the final numbers, for the CLI."""
    from rich.table import Table

    lam, sqrt_lam = summary["lambda"], summary["coupling"]["sqrt_lambda"]
    table = Table(title=f"theory: {summary['run_dir']}  (λ = {lam:.3g}, √λ = {sqrt_lam:.3g})")
    table.add_column("at the end")
    for t in TRAJECTORIES:
        table.add_column(LABELS[t], justify="right")
    names = {
        "loss": "L (clean loss)", "R": "R(θ)", "trace_hessian": "tr ∇²L", "lambda_max": "λ_max(∇²L)",
        "stationarity": "‖∇(L/λ + R)‖", "tangent_stationarity": "‖P_T ∇R‖ (along the manifold)",
        "recovery_error": "recovery error ‖v⊙v − w*‖",
    }  # fmt: skip
    for key, label in names.items():
        if key in summary["label_noise"]:
            table.add_row(label, *(_fmt(summary[t].get(key)) for t in TRAJECTORIES))
    c = summary["coupling"]
    table.add_row("‖θ − Φ‖ at the end", _fmt(c["final_distance"]), _fmt(c["plain_final_distance"]), "0")
    table.add_row("max ‖θ − Φ‖ over the run", f"{_fmt(c['max_distance'])} = {c['max_distance_over_sqrt_lambda']:.3g}·√λ", "", "")
    return table


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.4g}"
