"""Sharpness of a model at its current parameters, as one dict of metrics.

``measure_sharpness`` builds the Hessian operator of a loss over fixed examples
and runs the estimators of ``lnsgd.curvature`` on it. Around it, the glue
between runs and curvature: ``sharpness_of_model`` measures a recipe's model on
its data, ``training_hook`` is the training loop's periodic tracking, and
``measure_checkpoint`` is everything ``lnsgd measure-sharpness`` reports.
``plot_density`` draws a spectral density from ``curvature.spectral_density``.

The loss measured is, by default, the training loss in expectation over the recipe's
label noise (``losses.expected_loss``: label-smoothed cross-entropy for flip noise),
the L of the theory; ``loss="clean"`` measures the clean loss instead
(``measured_loss``). The Hessian is taken over a fixed evaluation subset: the first
N training examples, in order, so every measurement of a run sees the same examples
(``evaluation_subset``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lnsgd import curvature
from lnsgd.curvature.operators import check_int, free_memory
from lnsgd.curvature.regularizer import deflation_run_length, eta_bound, regularizer_scale
from lnsgd.data import Data, model_targets
from lnsgd.errors import LnsgdError
from lnsgd.losses import clean_loss, expected_loss
from lnsgd.recipe import Recipe, describe_measured_loss, parse_measured_loss
from lnsgd.runtime import stream_seed
from lnsgd.train.step import tf32_allowed

MEASURES = ("trace", "lambda_max", "trace_gn", "R")
TRACE_METHODS = ("auto", "split", "xtrace", "hutchpp", "hutchinson")


class _CountingMatvec:
    """Wraps an operator to count products and report progress."""

    def __init__(self, op: curvature.HessianOperator, progress, total: int, ticks: _CountingMatvec | None = None):
        self.op, self.progress, self.total = op, progress, total
        self.dtype, self.device, self.dim = op.dtype, op.device, op.dim
        self.count = 0  # HVPs
        self.done = 0  # HVPs + tr G samples
        self.ticks = ticks  # another counter whose progress this one advances

    def __call__(self, v: Tensor) -> Tensor:
        out = self.op(v)
        self.count += 1
        self.tick()
        return out

    def tick(self) -> None:
        """One unit of work done: an HVP or a tr G sample."""
        if self.ticks is not None:
            self.ticks.tick()
            return
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def _lanczos_length(hvps: int, top_k: int, dim: int) -> int:
    # λ_max alone converges in ~20 products (DESIGN.md); a few more per extra
    # eigenvalue asked for.
    return min(dim, hvps, max(30, 3 * top_k))


def _measure_sharpness(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    measures: Sequence[str] = MEASURES,
    hvps: int = 100,
    top_k: int = 1,
    eta: float | None = None,
    momentum: float = 0.0,
    generator: torch.Generator,
    chunk_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    skip_undefined_R: bool = False,
    trace_method: str = "auto",
    rtol: float | None = None,
) -> dict:
    """Curvature of the mean of ``loss_fn`` over ``(inputs, targets)`` at the model's θ.

    measures: any of "trace" (tr∇²L by ``trace_method``), "lambda_max" (top
        ``top_k`` eigenvalues by Lanczos), "trace_gn" (tr G, exact, from
        per-example Jacobians; needs a loss with ``.kind``) and "R" (R(θ) for
        learning rate ``eta`` and ``momentum`` by deflated SLQ).
    trace_method: "auto" (default; ``curvature.choose_trace``: exact tr G, then a
        pilot decides whether ∇²L − G or ∇²L is probed, by XTrace), "split" (always
        the residual: ``curvature.trace_hessian(method="split")``) — both need a
        loss with ``.kind`` — or an ``estimate_trace`` method on ∇²L itself:
        "xtrace", "hutchpp", "hutchinson". The result's ``trace_method`` says
        which was used (``auto:split`` / ``auto:hessian`` for auto, or
        ``auto:exact`` where every parameter provably enters the model linearly,
        ``curvature.is_piecewise_linear``: then tr∇²L = tr G, no product, stderr 0).
    hvps: Hessian-vector products per estimator. When R is measured, its
        deflation Lanczos run (70% of ``hvps``) also yields λ_max and the top
        eigenvalues, so they cost nothing extra; otherwise they get their own run
        of min(hvps, max(30, 3·top_k)) products. Exact tr G costs about C
        gradients over the examples (C outputs) and counts as one progress unit.
    rtol: adaptive budget of the trace (``None``: spend ``hvps``). Rounds of fresh
        probes (the first max(8, hvps/4) products, then twice the last, within ``hvps``)
        are pooled with weights proportional to their budgets, and the trace stops once
        its standard error is below ``rtol``·|estimate|. Weights fixed by budgets keep
        each round's estimate unbiased; the data-dependent stop adds a bias well below
        the standard error. A round of XTrace at a small budget is less accurate than
        one at the full budget, so a measurement that never stops early is somewhat
        noisier than with ``rtol=None``.
    skip_undefined_R: if η ≥ 2(1+β)/λ_max, record ``sharp/R`` as None instead
        of raising the ``LnsgdError`` (for tracking during training).
    progress: called as progress(done, total) after every HVP or tr G sample
        (each counts one unit); ``total`` is the planned count, and the last call
        has done == total.

    A ``torch.compile``d model is measured through its eager module (compiled
    graphs have no double backward). The model runs in eval mode (each
    module's train/eval flag is restored), with autocast off, in float64 if its
    parameters are float64 and float32 otherwise (a float32 copy is made of a
    bf16/fp16 model). Returns a dict with
    ``sharp/trace_hessian``, ``sharp/trace_hessian_stderr``, ``sharp/lambda_max``,
    ``sharp/top_eigenvalues`` (list, largest first), ``sharp/trace_gn``,
    ``sharp/trace_gn_stderr``, ``sharp/R``, ``sharp/R_stderr`` (only those
    measured), plus ``hvps_per_estimator`` (the budget ``hvps``), ``hvps_spent``
    (the HVPs all estimators spent together; exact tr G is not an HVP and not
    counted), ``hvps`` (the same as ``hvps_spent``), ``examples`` and ``seconds``.
    """
    measures = _check_measures(measures)
    check_int("hvps", hvps, 10 if "R" in measures else 4)
    check_int("top_k", top_k, 1)
    if trace_method not in TRACE_METHODS:
        raise LnsgdError(f"trace_method must be one of {', '.join(TRACE_METHODS)}; got {trace_method!r}")
    split = "trace" in measures and trace_method in ("auto", "split")
    if "R" in measures:
        if eta is None:
            raise LnsgdError("eta (the learning rate η) is required to measure R(θ); pass eta=… or drop 'R'")
        regularizer_scale(eta, momentum)  # checks η and β before any product is spent
    if not isinstance(generator, torch.Generator):
        raise LnsgdError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    if (split or "trace_gn" in measures) and curvature.loss_kind(loss_fn) is None:
        raise LnsgdError(
            f"trace_method={trace_method!r} and the measure 'trace_gn' need tr G, which needs a loss with .kind 'cross_entropy' "
            f"or 'mse' (lnsgd.curvature.cross_entropy_loss, smoothed_cross_entropy(p, C) or mse_loss); got {loss_fn!r}; "
            "for other losses pass trace_method='xtrace' and leave 'trace_gn' out of measures"
        )
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise LnsgdError(f"rtol must be a number between 0 and 1 (e.g. 0.02 for 2%); got {rtol!r}")

    model = _measurable(model)
    started = time.perf_counter()
    op, dim = curvature.hessian_matvec(model, loss_fn, inputs, targets, chunk_size)
    eigen_iters = deflation_run_length(hvps, dim) if "R" in measures else _lanczos_length(hvps, top_k, dim)
    wants_eigen = "lambda_max" in measures or "R" in measures
    if wants_eigen and top_k > eigen_iters:
        raise LnsgdError(f"top_k ({top_k}) must be ≤ the Lanczos run length ({eigen_iters}); raise hvps or lower top_k")
    total = (
        (hvps if "R" in measures else eigen_iters if wants_eigen else 0)
        + (hvps if "trace" in measures else 0)
        + (1 if "trace_gn" in measures or split else 0)
    )
    matvec = _CountingMatvec(op, progress, total)
    result: dict = {}

    with curvature.evaluation_mode(model):
        if wants_eigen:
            # One Lanczos run serves λ_max, the top eigenvalues and R's deflation.
            first = curvature.lanczos(matvec, dim, eigen_iters, generator)
            theta, _, _ = curvature.ritz_pairs(first)
            result["sharp/lambda_max"] = float(theta[0])
            result["sharp/top_eigenvalues"] = [float(t) for t in theta[:top_k]]
            if "R" in measures:
                try:
                    r = curvature.estimate_R(matvec, dim, eta, momentum, hvps, generator, lanczos_result=first)
                    result["sharp/R"], result["sharp/R_stderr"] = r.value, r.stderr
                except curvature.RUndefinedError:
                    if not skip_undefined_R:
                        raise
                    result["sharp/R"], result["sharp/R_stderr"] = None, None
        if "trace" in measures and not split:
            tr = adaptive_trace(lambda m: curvature.estimate_trace(matvec, dim, m, generator, method=trace_method), hvps, rtol)
            result["sharp/trace_hessian"] = tr.value
            result["sharp/trace_hessian_stderr"] = tr.stderr
        hvp_count = matvec.count
        if not split:
            op.release()  # free the cached gradient graph before tr G builds its own
        if split or "trace_gn" in measures:
            gn = curvature.exact_trace_gauss_newton(model, loss_fn, inputs, targets, chunk_size)
            matvec.tick()
            if "trace_gn" in measures:
                result["sharp/trace_gn"] = gn.value
                result["sharp/trace_gn_stderr"] = 0.0
        if split and trace_method == "auto" and curvature.is_piecewise_linear(model):
            # Every parameter enters linearly: tr(∇²L − G) = 0 exactly, no product needed.
            tr = curvature.exact_split(gn.value)
            op.release()
            result["sharp/trace_hessian"] = tr.value
            result["sharp/trace_hessian_stderr"] = tr.stderr
            result["trace_residual"] = tr.residual
            result["trace_method"] = tr.method
        elif split:
            residual_op, _ = curvature.residual_matvec(model, loss_fn, inputs, targets, chunk_size)
            residual = _CountingMatvec(residual_op, progress, total, ticks=matvec)
            if trace_method == "auto":
                tr = adaptive_trace(lambda m: curvature.choose_trace(matvec, residual, dim, gn.value, m, generator), hvps, rtol)
            else:
                tr = adaptive_trace(lambda m: curvature.split_trace(residual, dim, gn.value, m, generator), hvps, rtol)
            residual_op.release()
            op.release()
            hvp_count = matvec.count + residual.count
            result["sharp/trace_hessian"] = tr.value
            result["sharp/trace_hessian_stderr"] = tr.stderr
            result["trace_residual"] = tr.residual
            result["trace_method"] = tr.method
    if progress is not None:
        progress(total, total)
    result["hvps_per_estimator"] = hvps
    result["hvps_spent"] = hvp_count
    result["hvps"] = hvp_count  # = hvps_spent; kept for the readers of the old key
    result["examples"] = int(inputs.shape[0])
    result["seconds"] = time.perf_counter() - started
    return result


def measure_sharpness(model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor, **kwargs) -> dict:
    """Curvature of the mean of ``loss_fn`` over ``(inputs, targets)`` at the model's θ (see ``_measure_sharpness``).

    Every product runs with TF32 off (a checkpoint measures the same in ``measure-sharpness``
    and during fp32 or tf32 training); the vectors the estimators keep are checked against the
    device's free memory first, and an out-of-memory is one ``LnsgdError`` naming what to lower.
    """
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    check_memory(params, inputs.device, hvps=kwargs.get("hvps", 100), measures=kwargs.get("measures", MEASURES))
    try:
        with tf32_allowed(False):  # a checkpoint measures the same in fp32 and tf32 training and in measure-sharpness
            return _measure_sharpness(model, loss_fn, inputs, targets, **kwargs)
    except torch.OutOfMemoryError:
        raise LnsgdError(
            f"out of memory on {inputs.device} measuring sharpness over {inputs.shape[0]} examples "
            f"({params:,} parameters, chunk_size {kwargs.get('chunk_size', 1024)}): pass fewer inputs (the CLI's "
            "--examples, a recipe's track.sharpness.examples), a lower hvps (--hvps, track.sharpness.hvps) or a smaller chunk_size"
        ) from None


# ---------------------------------------------------------------------------
# A recipe's model on its data: the glue between runs and measure_sharpness.
# ---------------------------------------------------------------------------


def measured_loss(recipe: Recipe, num_outputs: int, which: str = "expected"):
    """The loss whose curvature is measured: expected under the recipe's noise, clean, or expected
    under an explicit noise model (``flip:P``, ``gaussian:SIGMA``; see ``parse_measured_loss``)."""
    kind, value = parse_measured_loss(which)
    if kind == "clean":
        return clean_loss(recipe.loss)
    if kind == "expected":
        return expected_loss(recipe.loss, recipe.noise.kind, recipe.noise.p, recipe.noise.sigma, num_outputs)
    return expected_loss(recipe.loss, kind, value if kind == "flip" else 0.0, value if kind == "gaussian" else 0.0, num_outputs)


def measured_loss_label(recipe: Recipe, which: str = "expected") -> str:
    """What was measured on ``recipe``'s run ("flip p=0.2", "clean"; see ``recipe.describe_measured_loss``)."""
    n = recipe.noise
    return describe_measured_loss(which, recipe.loss, n.kind, n.p, n.sigma)


def evaluation_subset(data: Data, recipe: Recipe, examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``examples`` training examples, normalized, with loss-ready clean targets."""
    n = len(data.train_x)
    if examples <= 0 or examples > n:
        raise LnsgdError(f"examples={examples} must be between 1 and the training set size ({n})")
    return data.normalize(data.train_x[:examples]), model_targets(data, data.train_y[:examples], recipe.loss)


def sharpness_of_model(model: nn.Module, recipe: Recipe, data: Data, *, measures=("trace",), examples: int = 1000,
                       hvps: int = 40, which: str = "expected", generator_seed: int = 0, eta: float | None = None,
                       momentum: float | None = None, top_k: int = 1, skip_undefined_R: bool = True, progress=None,
                       trace_method: str = "auto", rtol: float | None = None) -> dict:  # fmt: skip
    """Curvature metrics (``sharp/*``) of ``model`` on the recipe's expected (or clean) loss."""
    inputs, targets = evaluation_subset(data, recipe, min(examples, len(data.train_x)))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    return measure_sharpness(
        model, measured_loss(recipe, data.num_classes, which), inputs, targets, measures=measures, hvps=hvps, top_k=top_k,
        eta=recipe.optim.lr if eta is None else eta, momentum=recipe.optim.momentum if momentum is None else momentum,
        generator=generator, skip_undefined_R=skip_undefined_R, progress=progress, trace_method=trace_method, rtol=rtol,
    )  # fmt: skip


def training_hook(recipe: Recipe, loss_recipe: Recipe | None = None):
    """A ``sharpness_hook`` for ``train``: measures every ``track.sharpness.every`` epochs.

    ``loss_recipe`` (default: ``recipe``) supplies the noise model of the expected loss, so
    a plain-SGD control can be measured on the same loss as its label-noise twin.
    Its generator is seeded from (seed, phase, epoch) alone, so measuring never touches
    the training generators and a resumed run measures exactly what an uninterrupted one did.
    """
    cfg = recipe.track.sharpness
    loss_recipe = loss_recipe or recipe  # whose noise model defines the expected loss
    if cfg is None:
        return None
    keys = ("sharp/trace_hessian", "sharp/trace_hessian_stderr", "sharp/lambda_max", "sharp/trace_gn", "sharp/R")

    def hook(model: nn.Module, data: Data, phase: str, epoch: int) -> dict:
        if epoch % cfg.every:
            return {}
        result = sharpness_of_model(
            model, loss_recipe, data, measures=cfg.measures, examples=min(cfg.examples, len(data.train_x)), hvps=cfg.hvps,
            which=cfg.loss, generator_seed=stream_seed(recipe.seed, f"sharpness:{phase}:{epoch}"), trace_method=cfg.trace_method,
            rtol=cfg.rtol,
        )  # fmt: skip
        row = {k: result[k] for k in keys if k in result}
        row["sharp/loss"] = measured_loss_label(loss_recipe, cfg.loss)
        return row

    return hook


def measure_checkpoint(path, *, eta: float | None = None, momentum: float | None = None, examples: int | None = None,
                       hvps: int = 100, top_k: int = 1, seed: int = 0, which: str = "expected",
                       measures=("trace", "lambda_max", "trace_gn", "R"), device: str = "auto", density=None,
                       progress=None, trace_method: str = "auto", rtol: float | None = None) -> dict:  # fmt: skip
    """Everything ``lnsgd measure-sharpness`` reports for one checkpoint, as a JSON-ready dict.

    η and β default to the checkpoint's recipe; ``examples`` to the first 5000 training
    examples (or all if fewer); the loss to the expectation over the recipe's label noise.
    """
    from lnsgd.checkpoint import load_checkpoint
    from lnsgd.data import load
    from lnsgd.runtime import resolve_device

    if eta is not None and eta <= 0:
        raise LnsgdError(f"--eta {eta}: the learning rate must be > 0")
    if momentum is not None and not 0 <= momentum < 1:
        raise LnsgdError(f"--momentum {momentum}: β must be in [0, 1)")
    dev = resolve_device(device)
    model, recipe = load_checkpoint(path, device=dev)
    data = load(recipe, dev)
    n = len(data.train_x)
    examples = min(5000, n) if examples is None else examples
    if examples <= 0 or examples > n:
        raise LnsgdError(f"--examples {examples}: must be between 1 and the training set size ({n}) of {recipe.data.name}")
    eta = recipe.optim.lr if eta is None else eta
    momentum = recipe.optim.momentum if momentum is None else momentum
    started = time.perf_counter()
    result = sharpness_of_model(model, recipe, data, measures=measures, examples=examples, hvps=hvps, which=which,
                                generator_seed=seed, eta=eta, momentum=momentum, top_k=top_k, skip_undefined_R=False,
                                progress=progress, trace_method=trace_method, rtol=rtol)  # fmt: skip
    out = {
        "checkpoint": str(path),
        "loss": f"{measured_loss_label(recipe, which)} ({measured_loss(recipe, data.num_classes, which)!r})",
        "trace_hessian": result.get("sharp/trace_hessian"),
        "trace_hessian_stderr": result.get("sharp/trace_hessian_stderr"),
        "trace_method": result.get("trace_method", trace_method) if "trace" in measures else None,
        "trace_residual": result.get("trace_residual"),
        "lambda_max": result.get("sharp/lambda_max"),
        "top_eigenvalues": result.get("sharp/top_eigenvalues"),
        "trace_gn": result.get("sharp/trace_gn"),
        "trace_gn_stderr": result.get("sharp/trace_gn_stderr"),
        "R": result.get("sharp/R"),
        "R_stderr": result.get("sharp/R_stderr"),
        "R_bound_eta": eta_bound(result["sharp/lambda_max"], momentum) if result.get("sharp/lambda_max") else None,
        "eta": eta,
        "momentum": momentum,
        "examples": examples,
        "hvps_per_estimator": hvps,  # the budget each estimator was given (--hvps)
        "hvps_spent": result["hvps_spent"],  # all HVPs spent, every estimator and --density together
        "hvps": result["hvps_spent"],  # the same as hvps_spent: the key older readers use
        "seed": seed,
    }
    if density is not None:
        inputs, targets = evaluation_subset(data, recipe, examples)
        op, dim = curvature.hessian_matvec(model, measured_loss(recipe, data.num_classes, which), inputs, targets)
        gen = torch.Generator(device=dev).manual_seed(seed)
        nodes, weights = curvature.spectral_density(op, dim, hvps, gen)
        out["density"] = str(plot_density(nodes, weights, density, title=f"Hessian spectral density ({which} loss)\n{path}"))
        out["hvps_spent"] += hvps
        out["hvps"] = out["hvps_spent"]
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


# ---------------------------------------------------------------------------
# Memory, adaptive budgets, checks.
# ---------------------------------------------------------------------------


def vector_bytes(params: int, hvps: int, measures: Sequence[str], bytes_per_value: int = 4) -> int:
    """Memory of the parameter-sized vectors a measurement keeps at once (a lower bound of its need).

    Lanczos with full reorthogonalization keeps its whole basis (≤ hvps vectors); XTrace keeps
    its sketch and its products (2 × hvps/2); tr G keeps a few gradients. Activations of one
    chunk's double backward come on top (they scale with ``chunk_size``, not with ``hvps``).
    """
    measures = tuple(measures)
    kept = 8  # working vectors: the gradient, a product, the probe, Ritz vectors
    if "lambda_max" in measures or "R" in measures:
        kept += hvps
    if "trace" in measures:
        kept += hvps
    return kept * params * bytes_per_value


def check_memory(params: int, device: torch.device, *, hvps: int, measures: Sequence[str]) -> None:
    need, free = vector_bytes(params, hvps, measures), free_memory(device)
    if free is not None and need > free:
        raise LnsgdError(
            f"this measurement keeps {hvps}+ vectors of {params:,} parameters, {need / 2**30:.1f} GiB, and {device} has "
            f"{free / 2**30:.1f} GiB free: lower hvps (the CLI's --hvps, a recipe's track.sharpness.hvps) or measure fewer quantities"
        )


def adaptive_trace(estimate: Callable[[int], tuple], hvps: int, rtol: float | None):
    """``estimate(budget)`` in rounds until its pooled standard error is below ``rtol``·|value| or ``hvps`` is spent.

    Rounds are independent (fresh probes); they are pooled with weights proportional to their
    budgets (variance ∝ 1/budget), fixed in advance, so the pooled value stays unbiased per round.
    Fields other than value/stderr/num_matvecs (``residual`` of a split) are pooled the same way.
    """
    if rtol is None:
        return estimate(hvps)
    rounds, spent, budget = [], 0, min(hvps, max(8, hvps // 4))
    while True:
        est = estimate(budget)
        rounds.append((budget, est))
        spent += budget
        total = sum(b for b, _ in rounds)
        value = sum(b * e.value for b, e in rounds) / total
        stderr = math.sqrt(sum((b * e.stderr) ** 2 for b, e in rounds)) / total
        left = hvps - spent
        if stderr <= rtol * abs(value) or left < 4:
            break
        budget = min(2 * budget, left)
    pooled = {"value": value, "stderr": stderr, "num_matvecs": sum(e.num_matvecs for _, e in rounds)}
    if hasattr(est, "residual"):
        pooled["residual"] = sum(b * e.residual for b, e in rounds) / total
    return est._replace(**pooled)


def _check_measures(measures: Sequence[str]) -> tuple[str, ...]:
    if isinstance(measures, str):
        measures = (measures,)
    measures = tuple(measures)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise LnsgdError(f"measures must be a non-empty subset of {list(MEASURES)}; got {list(measures)}")
    return measures


def _measurable(model: nn.Module) -> nn.Module:
    # Curvature in bf16/fp16 is noise: a half-precision model is measured through a
    # float32 copy (the caller's model is left untouched).
    params = [p for p in model.parameters() if p.requires_grad]
    if params and params[0].dtype not in (torch.float32, torch.float64):
        return copy.deepcopy(model).float()
    return model


def plot_density(
    nodes: Tensor,
    weights: Tensor,
    path: str | Path,
    title: str | None = None,
    *,
    sigma: float | None = None,
    num_points: int = 1000,
) -> Path:
    """Save the spectral density Σⱼ wⱼ·N(x; θⱼ, σ²) on a log-y axis to ``path``.

    ``nodes``/``weights`` come from ``curvature.spectral_density``; the Gaussian
    broadening (Ghorbani, Krishnan & Xiao 2019) defaults to σ = 1% of the node
    range. Uses matplotlib's Agg canvas directly, so no global backend is set.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nodes = torch.as_tensor(nodes, dtype=torch.float64).reshape(-1).cpu()
    weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).cpu()
    if nodes.numel() == 0 or nodes.shape != weights.shape:
        raise LnsgdError(f"nodes and weights must be non-empty and of equal length; got {nodes.numel()} and {weights.numel()}")
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-3
    if not sigma > 0:
        raise LnsgdError(f"sigma must be > 0; got {sigma!r}")
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    z = (grid[:, None] - nodes[None, :]) / sigma
    density = (weights[None, :] * torch.exp(-0.5 * z**2)).sum(1) / (sigma * (2 * torch.pi) ** 0.5)
    floor = float(density.max()) * 1e-12  # keep the log axis finite

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.semilogy(grid.numpy(), density.clamp_min(floor).numpy())
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title:
        # Wrapped to the figure's width (about 60 characters at 6 in): a checkpoint's path would run past the edge.
        import textwrap

        lines = [textwrap.fill(line, 60, break_long_words=True, break_on_hyphens=False) for line in title.splitlines()]
        ax.set_title("\n".join(lines), fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
