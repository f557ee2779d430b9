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
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lnsgd import curvature
from lnsgd.curvature.operators import check_data, check_int, free_memory, no_autocast, to_model, trainable_parameters
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


# The ``sharp/*`` measures that a projection repeats at the projected point, as ``sharp/proj_*``.
PROJECTED_KEYS = ("trace_hessian", "trace_hessian_stderr", "lambda_max", "top_eigenvalues", "trace_gn", "trace_gn_stderr",
                  "R", "R_stderr")  # fmt: skip
# What a projection reports, as ``sharp/proj_*`` columns: (column, Projection field).
PROJECTION_COLUMNS = (("steps", "steps"), ("distance", "distance"), ("loss_before", "loss_before"), ("loss", "loss_after"),
                      ("grad_norm_before", "grad_norm_before"), ("grad_norm", "grad_norm_after"), ("converged", "converged"))  # fmt: skip


def sharpness_of_model(model: nn.Module, recipe: Recipe, data: Data, *, measures=("trace",), examples: int = 1000,
                       hvps: int = 40, which: str = "expected", generator_seed: int = 0, eta: float | None = None,
                       momentum: float | None = None, top_k: int = 1, skip_undefined_R: bool = True, progress=None,
                       trace_method: str = "auto", rtol: float | None = None, project: bool = False,
                       project_tol: float = 1e-4, project_steps: int = 500) -> dict:  # fmt: skip
    """Curvature metrics (``sharp/*``) of ``model`` on the recipe's expected (or clean) loss.

    With ``project``, the same measures are taken again at the nearest minimizer of that loss
    on the same examples (``project_to_minimizer`` to ‖∇L‖ ≤ ``project_tol`` within
    ``project_steps`` steps), as ``sharp/proj_trace_hessian`` etc., with the projection's
    report as ``sharp/proj_steps``, ``_distance``, ``_loss_before``, ``_loss``,
    ``_grad_norm_before``, ``_grad_norm`` and ``_converged``; ``projection`` holds the
    ``Projection`` itself. Both use generators seeded from ``generator_seed`` alone.
    """
    inputs, targets = evaluation_subset(data, recipe, min(examples, len(data.train_x)))
    device = next(model.parameters()).device
    loss_fn = measured_loss(recipe, data.num_classes, which)
    kwargs = dict(measures=measures, hvps=hvps, top_k=top_k, eta=recipe.optim.lr if eta is None else eta,
                  momentum=recipe.optim.momentum if momentum is None else momentum, skip_undefined_R=skip_undefined_R,
                  trace_method=trace_method, rtol=rtol)  # fmt: skip
    if project:  # checked before any product is spent
        check_projection_settings(project_tol, project_steps, ("project_tol", "project_steps"))
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    result = measure_sharpness(model, loss_fn, inputs, targets, generator=generator, progress=progress, **kwargs)
    if project:
        projected, report = project_to_minimizer(model, loss_fn, inputs, targets, tol=project_tol, max_steps=project_steps,
                                                 seed=generator_seed)  # fmt: skip
        generator = torch.Generator(device=device).manual_seed(generator_seed)
        # R may be undefined at the projected point (η ≥ 2/λ_max there): None, not an error.
        at = measure_sharpness(projected, loss_fn, inputs, targets, generator=generator, **{**kwargs, "skip_undefined_R": True})
        result.update({f"sharp/proj_{k}": at[f"sharp/{k}"] for k in PROJECTED_KEYS if f"sharp/{k}" in at})
        result.update({f"sharp/proj_{col}": getattr(report, f) for col, f in PROJECTION_COLUMNS})
        result["projection"] = report
        result["hvps_spent"] += at["hvps_spent"] + report.hvps
        result["hvps"] = result["hvps_spent"]
        result["seconds"] += at["seconds"] + report.seconds
    return result


def projection_warning(report: Projection, where: str = "", no_minimizer: bool = False) -> str | None:
    """One line saying a projection did not reach its tolerance, or reached it on a loss without
    a minimizer (``no_minimizer``: see ``has_no_minimizer``); None otherwise."""
    if no_minimizer and report.converged:
        return (
            f"projection{where}: the clean cross-entropy has no minimizer where the model fits its examples (the loss falls "
            f"towards 0 only as the logits grow); ‖∇L‖ ≤ tol {report.tol:g} was reached at loss {report.loss_after:.3g}, "
            f"{report.distance:.3g} from θ, a point set by the tolerance, not a point of Γ — measure an expected loss with a "
            "minimizer instead (--loss flip:0.2, track.sharpness.loss: flip:0.2)"
        )
    if report.converged:
        return None
    why = "no further step lowered the loss" if report.stop_reason == "line_search" else f"after {report.steps} steps (the cap)"
    return (
        f"projection{where} did not converge: ‖∇L‖ = {report.grad_norm_after:.3g} > tol {report.tol:g} {why}; the "
        f"values at the projection (sharp/proj_*) are at its last point, {report.distance:.3g} from θ — raise the step cap or "
        "tol, or measure a loss with a minimizer on these examples (an expected loss under label noise has one; the clean one may not)"
    )


def has_no_minimizer(recipe: Recipe, which: str, report: Projection, examples: int) -> bool:
    """Whether the projection ended on a loss without a finite minimizer: the clean cross-entropy
    at a point that classifies every example correctly (a mean loss below ln 2/n: one wrong
    example alone adds at least that), where scaling the logits up lowers the loss further."""
    clean_ce = recipe.loss == "cross_entropy" and measured_loss_label(recipe, which) == "clean"
    return clean_ce and report.loss_after < math.log(2) / examples


def check_projection_settings(tol, max_steps, names: tuple[str, str] = ("tol", "max_steps")) -> None:
    """A positive gradient-norm tolerance and a positive integer step cap, or one ``LnsgdError``
    naming the caller's argument (``names``)."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < math.inf):
        raise LnsgdError(f"{names[0]} must be a positive number, the gradient norm to stop at (e.g. {names[0]}=1e-4); got {tol!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise LnsgdError(
            f"{names[1]} must be a positive integer, the cap on descent steps (e.g. {names[1]}=500); got {max_steps!r}"
        )


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
    warned: list[int] = []

    def hook(model: nn.Module, data: Data, phase: str, epoch: int) -> dict:
        if epoch % cfg.every:
            return {}
        result = sharpness_of_model(
            model, loss_recipe, data, measures=cfg.measures, examples=min(cfg.examples, len(data.train_x)), hvps=cfg.hvps,
            which=cfg.loss, generator_seed=stream_seed(recipe.seed, f"sharpness:{phase}:{epoch}"), trace_method=cfg.trace_method,
            rtol=cfg.rtol, project=cfg.project, project_tol=cfg.project_tol, project_steps=cfg.project_steps,
        )  # fmt: skip
        row = {k: result[k] for k in keys if k in result}
        row["sharp/loss"] = measured_loss_label(loss_recipe, cfg.loss)
        if cfg.project:
            row.update({k: v for k, v in result.items() if k.startswith("sharp/proj_") and k != "sharp/proj_top_eigenvalues"})
            no_minimizer = has_no_minimizer(loss_recipe, cfg.loss, result["projection"], result["examples"])
            warning = projection_warning(result["projection"], f" at {phase} epoch {epoch}", no_minimizer)
            if warning and not (no_minimizer and warned):  # the loss's lack of a minimizer is said once per run
                print(f"lnsgd: warning: {warning}", file=sys.stderr, flush=True)
                warned.append(epoch)
        return row

    return hook


def measure_checkpoint(path, *, eta: float | None = None, momentum: float | None = None, examples: int | None = None,
                       hvps: int = 100, top_k: int = 1, seed: int = 0, which: str = "expected",
                       measures=("trace", "lambda_max", "trace_gn", "R"), device: str = "auto", density=None,
                       progress=None, trace_method: str = "auto", rtol: float | None = None, project: bool = False,
                       project_tol: float = 1e-4, project_steps: int = 500) -> dict:  # fmt: skip
    """Everything ``lnsgd measure-sharpness`` reports for one checkpoint, as a JSON-ready dict.

    η and β default to the checkpoint's recipe; ``examples`` to the first 5000 training
    examples (or all if fewer); the loss to the expectation over the recipe's label noise.
    With ``project``, ``projected`` holds the same quantities at the nearest minimizer of that
    loss (``sharpness_of_model``), ``projection`` the projection's report, and ``warning`` a
    line when it did not converge (None otherwise).
    """
    from lnsgd.checkpoint import load_checkpoint
    from lnsgd.data import load
    from lnsgd.runtime import resolve_device

    if eta is not None and eta <= 0:
        raise LnsgdError(f"--eta {eta}: the learning rate must be > 0")
    if project and not (isinstance(project_tol, (int, float)) and 0 < project_tol < math.inf):
        raise LnsgdError(f"--project-tol {project_tol}: the gradient-norm tolerance must be > 0, e.g. --project-tol 1e-4")
    if project and not (isinstance(project_steps, int) and project_steps >= 1):
        raise LnsgdError(f"--project-steps {project_steps}: the step cap must be a positive integer, e.g. --project-steps 500")
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
                                progress=progress, trace_method=trace_method, rtol=rtol, project=project,
                                project_tol=project_tol, project_steps=project_steps)  # fmt: skip
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
    if project:
        report = result["projection"]
        out["projected"] = {k: result.get(f"sharp/proj_{k}") for k in PROJECTED_KEYS}
        out["projected"]["R_bound_eta"] = eta_bound(out["projected"]["lambda_max"], momentum) if out["projected"]["lambda_max"] else None
        out["projection"] = report.as_dict(prefix="")
        out["warning"] = projection_warning(report, no_minimizer=has_no_minimizer(recipe, which, report, examples))
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


# ---------------------------------------------------------------------------
# Projection onto Γ, the manifold of minimizers of the measured loss.
# ---------------------------------------------------------------------------

PROJECTION_METHODS = ("lbfgs", "gd")
_C1 = 1e-4  # sufficient decrease (Armijo) constant of the line search
_MAX_HALVINGS = 40  # a line search that halves its step this often has hit the precision floor


@dataclass(frozen=True)
class Projection:
    """What ``project_to_minimizer`` did; ``as_dict`` gives its fields JSON-ready, under a prefix."""

    method: str  # "lbfgs" or "gd"
    converged: bool  # ‖∇L‖₂ ≤ tol at the returned point
    stop_reason: str  # "tolerance", "max_steps", or "line_search" (no step lowered L: a kink, or its precision floor)
    steps: int  # parameter updates made (≤ max_steps)
    evaluations: int  # full-batch loss-and-gradient evaluations, the starting point's included
    hvps: int  # Hessian-vector products spent on λ_max at the start
    distance: float  # ‖θ_proj − θ‖₂ over the trainable parameters
    loss_before: float  # L(θ), the mean loss over the examples
    loss_after: float  # L(θ_proj)
    grad_norm_before: float  # ‖∇L(θ)‖₂
    grad_norm_after: float  # ‖∇L(θ_proj)‖₂
    lambda_max: float  # the largest Ritz value of ∇²L(θ) (Lanczos at the start)
    step_size: float  # η = step_scale/λ_max: GD's step (after any halving), L-BFGS's first and restart step
    tol: float  # the gradient-norm tolerance asked for
    max_steps: int  # the step cap asked for
    seconds: float  # wall-clock time of the whole projection

    def as_dict(self, prefix: str = "proj/") -> dict:
        """Every field as ``{prefix + name: value}`` (Python floats, ints, bools and strings)."""
        return {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def project_to_minimizer(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    tol: float = 1e-4,
    max_steps: int = 500,
    method: str = "lbfgs",
    history: int = 10,
    step_scale: float = 1.0,
    lanczos_iters: int = 30,
    seed: int = 0,
    chunk_size: int = 1024,
) -> tuple[nn.Module, Projection]:
    """A copy of ``model`` descended on L, the mean of ``loss_fn`` over ``(inputs, targets)``, to ‖∇L‖₂ ≤ ``tol``.

    Deterministic full-batch descent from the model's θ (the gradient summed over chunks
    of ``chunk_size`` examples), stopped once the Euclidean norm of the gradient of the
    *mean* loss is ≤ ``tol`` or after ``max_steps`` parameter updates. A projection that
    does not converge returns ``converged=False`` (and ``stop_reason`` says why); it does
    not raise. Returns ``(projected_model, Projection)``.

    Step size: λ_max of ∇²L(θ) from ``lanczos_iters`` Lanczos products (a private
    generator seeded with ``seed`` draws the start vector), and η = ``step_scale``/λ_max,
    in (0, 2/λ_max) — the step for which GD on a quadratic is stable. Where λ_max ≤ 0 the
    largest |Ritz value| stands in. Every step is then checked by a line search that
    halves the step until L decreases enough: Armijo's condition, or where L's change is
    within its rounding (1e-6·|L|; 100·eps·|L| in float32), its gradient form
    ∇L(θ+td)·d ≤ (2c₁−1)∇L(θ)·d — Hager & Zhang's (2005, eq. 4.1) approximate Wolfe
    condition, equivalent to Armijo's on a quadratic and decidable in float32 near the
    minimum, where differences of L are not.

    method: "lbfgs" (default; Nocedal & Wright, Numerical Optimization, Alg. 7.4, memory
        ``history`` pairs, first step η, then the unit step) or "gd" (gradient descent with
        step η, halved for good whenever the line search has to). L-BFGS is the default
        because near Γ the Hessian is ill-conditioned — its nonzero eigenvalues span
        orders of magnitude — and GD needs ~κ·log(1/tol) steps. Steps to tol in
        tests/test_projection.py, L-BFGS vs GD: least squares (40 × 6) 15 vs 87; under-
        determined (8 × 30) 22 vs 300; an 83-parameter tanh MLP on smoothed cross-entropy,
        tol 1e-6, ~600 from its initialization vs not there after 30 000, and 238 vs 23 450
        from a point 0.09 off Γ.
        Both keep each iterate in θ + span{gradients so far}; for a linear model with MSE
        that is θ + the row space of X, so the minimizer reached is the one nearest θ,
        θ − X⁺(Xθ − y): the projection, not just some minimizer. Memory: 2·``history`` + 6
        parameter-sized vectors for L-BFGS, 6 for GD, plus Lanczos' basis at the start.

    The model is copied (``copy.deepcopy`` of its eager module: a ``torch.compile`` wrapper's
    ``_orig_mod``; a bf16/fp16 model is projected and returned in float32) and the copy is
    descended in eval mode, autocast and TF32 off; its train/eval flags are restored. The
    caller's model, its parameters and every generator (torch's global one included) are
    left untouched; parameters without ``requires_grad`` and buffers are not moved.
    """
    check_projection_settings(tol, max_steps)
    if method not in PROJECTION_METHODS:
        raise LnsgdError(f"method must be one of {', '.join(PROJECTION_METHODS)} (e.g. method='lbfgs'); got {method!r}")
    if isinstance(step_scale, bool) or not isinstance(step_scale, (int, float)) or not 0 < step_scale < 2:
        raise LnsgdError(f"step_scale must be a number in (0, 2), the step in units of 1/λ_max (e.g. step_scale=1.0); got {step_scale!r}")
    check_int("history", history, 1)
    check_int("lanczos_iters", lanczos_iters, 1)
    check_int("seed", seed, 0)
    check_data(inputs, targets, chunk_size)
    if not callable(loss_fn):
        raise LnsgdError(f"loss_fn must be callable, loss_fn(outputs, targets) → the mean loss; got {type(loss_fn).__name__}")

    started = time.perf_counter()
    projected = copy.deepcopy(getattr(model, "_orig_mod", model))  # the eager module of a torch.compile wrapper
    if any(p.dtype not in (torch.float32, torch.float64) for p in projected.parameters() if p.requires_grad):
        projected = projected.float()  # descending in bf16/fp16 cannot reach a small gradient norm
    _, params = trainable_parameters(projected)
    dtype = params[0].dtype
    dim = sum(p.numel() for p in params)
    # Parameter-sized vectors kept at once: Lanczos' basis at the start, then L-BFGS's pairs and work vectors.
    kept = max(min(lanczos_iters, dim), (2 * history if method == "lbfgs" else 0) + 6)
    need, free = kept * dim * params[0].element_size(), free_memory(params[0].device)
    if free is not None and need > free:
        raise LnsgdError(
            f"the projection keeps {kept} vectors of {dim:,} parameters, {need / 2**30:.1f} GiB, and {params[0].device} has "
            f"{free / 2**30:.1f} GiB free: lower history (now {history}) or lanczos_iters (now {lanczos_iters}), or measure without "
            "projecting (drop --project / track.sharpness.project)"
        )
    # Where differences of L drown in rounding, the line search decides on slopes instead.
    rounding = max(1e-6, 100 * torch.finfo(dtype).eps)
    evaluations = 0

    def evaluate(theta: Tensor) -> tuple[float, Tensor]:
        nonlocal evaluations
        evaluations += 1
        _assign(params, theta)
        return _loss_and_gradient(projected, params, loss_fn, inputs, targets, chunk_size)

    def line_search(theta, loss, grad, direction, t):
        """(t, θ + t·d, L, ∇L) at the first halving of ``t`` that lowers L enough, or None."""
        slope = float(grad @ direction)
        for _ in range(_MAX_HALVINGS):
            trial = theta + t * direction
            if torch.equal(trial, theta):
                return None  # the step no longer changes θ (at a kink of L, or below its resolution)
            f, g = evaluate(trial)
            armijo = f <= loss + _C1 * t * slope
            approximate_wolfe = f <= loss + rounding * abs(loss) and float(g @ direction) <= (2 * _C1 - 1) * slope
            if math.isfinite(f) and (armijo or approximate_wolfe):
                return t, trial, f, g
            t /= 2
        return None

    with tf32_allowed(False), curvature.evaluation_mode(projected):
        theta0 = curvature.flatten_params(projected)
        loss0, grad0 = evaluate(theta0)
        if not (math.isfinite(loss0) and bool(torch.isfinite(grad0).all())):
            raise LnsgdError(f"the loss or its gradient is not finite at the model's parameters (L = {loss0}): nothing to project")
        op, dim = curvature.hessian_matvec(projected, loss_fn, inputs, targets, chunk_size)
        ritz, _, _ = curvature.ritz_pairs(curvature.lanczos(op, dim, min(lanczos_iters, dim), torch.Generator().manual_seed(seed)))
        op.release()
        lambda_max = float(ritz[0])
        curv = lambda_max if lambda_max > 0 else float(ritz.abs().max())
        grad_norm0 = float(grad0.norm())
        eta = step_scale / curv if curv > 0 else step_scale / max(grad_norm0, torch.finfo(dtype).tiny)

        theta, loss, grad, grad_norm = theta0, loss0, grad0, grad_norm0
        steps, stop_reason = 0, "tolerance"
        pairs: list[tuple[Tensor, Tensor, float]] = []  # L-BFGS memory (s, y, 1/sᵀy), oldest first
        while grad_norm > tol:
            if steps == max_steps:
                stop_reason = "max_steps"
                break
            if method == "gd":
                found = line_search(theta, loss, grad, -grad, eta)
                if found is not None:
                    eta = found[0]  # a step that had to be halved stays halved
            else:
                direction = _lbfgs_direction(grad, pairs)
                found = None
                if pairs and float(grad @ direction) < 0:
                    found = line_search(theta, loss, grad, direction, 1.0)
                if found is None:  # first step, or the memory led nowhere: restart from steepest descent
                    pairs.clear()
                    found = line_search(theta, loss, grad, -grad, eta)
            if found is None:
                stop_reason = "line_search"
                break
            _, new_theta, loss, new_grad = found
            if method == "lbfgs":
                s, y = new_theta - theta, new_grad - grad
                sy = float(s @ y)
                # Keep only pairs of clearly positive curvature: the inverse-Hessian estimate stays positive definite.
                if sy > torch.finfo(dtype).eps ** 0.5 * float(s.norm()) * float(y.norm()):
                    pairs.append((s, y, 1.0 / sy))
                    del pairs[:-history]
            theta, grad, grad_norm = new_theta, new_grad, float(new_grad.norm())
            steps += 1
        _assign(params, theta)  # the last evaluation may have been a rejected trial
        distance = float((theta.double() - theta0.double()).norm())

    report = Projection(
        method=method, converged=grad_norm <= tol, stop_reason=stop_reason, steps=steps, evaluations=evaluations,
        hvps=op.num_matvecs, distance=distance, loss_before=loss0, loss_after=loss, grad_norm_before=grad_norm0,
        grad_norm_after=grad_norm, lambda_max=lambda_max, step_size=eta, tol=float(tol), max_steps=max_steps,
        seconds=time.perf_counter() - started,
    )  # fmt: skip
    return projected, report


def _lbfgs_direction(grad: Tensor, pairs: list[tuple[Tensor, Tensor, float]]) -> Tensor:
    """−H·∇L by L-BFGS's two-loop recursion (Nocedal & Wright, Alg. 7.4), H₀ = (sᵀy/yᵀy)·I from the newest pair."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(pairs):
        alpha = rho * float(s @ q)
        q.sub_(y, alpha=alpha)
        alphas.append(alpha)
    if pairs:
        s, y, rho = pairs[-1]
        q.mul_(1.0 / (rho * float(y @ y)))
    for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
        q.add_(s, alpha=alpha - rho * float(y @ q))
    return q.neg_()


def _assign(params: list[nn.Parameter], theta: Tensor) -> None:
    """Write the flat vector ``theta`` into ``params`` (``model.parameters()`` order)."""
    with torch.no_grad():
        for p, piece in zip(params, theta.split([p.numel() for p in params]), strict=True):
            p.copy_(piece.view_as(p))


def _loss_and_gradient(model, params, loss_fn, inputs, targets, chunk_size) -> tuple[float, Tensor]:
    """L, the mean of ``loss_fn`` over all examples, and ∇L as one flat vector, a chunk at a time."""
    n = inputs.shape[0]
    dtype, device = params[0].dtype, params[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    grad = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
    with torch.enable_grad(), no_autocast(device):
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            x, y = to_model(inputs[start:stop], dtype, device), to_model(targets[start:stop], dtype, device)
            # Each chunk's mean weighted by its share: the sum is the full-batch mean.
            loss = loss_fn(model(x), y) * ((stop - start) / n)
            pieces = torch.autograd.grad(loss, params, allow_unused=True)
            grad += torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, pieces, strict=True)])
            total += loss.detach().double()
    return float(total), grad
