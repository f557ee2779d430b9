"""Sharpness of a recipe's model on its data: the glue between runs and ``lnsgd.sharpness``.

The loss measured is, by default, the training loss in expectation over the recipe's
label noise (``losses.expected_loss``: label-smoothed cross-entropy for flip noise),
the L of the theory; ``loss="clean"`` measures the clean loss instead. The Hessian is
taken over a fixed evaluation subset: the first N training examples, in order, so
every measurement of a run sees the same examples.
"""

from __future__ import annotations

import torch
from torch import nn

from lnsgd.data import Data
from lnsgd.errors import LnsgdError
from lnsgd.losses import clean_loss, expected_loss
from lnsgd.recipe import Recipe
from lnsgd.runtime import stream_seed
from lnsgd.train import model_targets


def measured_loss(recipe: Recipe, num_outputs: int, which: str = "expected"):
    """The loss whose curvature is measured: expected under the recipe's noise, or clean."""
    if which == "clean":
        return clean_loss(recipe.loss)
    return expected_loss(recipe.loss, recipe.noise.kind, recipe.noise.p, recipe.noise.sigma, num_outputs)


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
    from lnsgd.sharpness import measure_sharpness

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
        row["sharp/loss"] = cfg.loss
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
    import time

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
        "loss": f"{which} ({measured_loss(recipe, data.num_classes, which)!r})",
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
        "R_bound_eta": 2 * (1 + momentum) / result["sharp/lambda_max"] if result.get("sharp/lambda_max") else None,
        "eta": eta,
        "momentum": momentum,
        "examples": examples,
        "hvps": result["hvps"],
        "seed": seed,
    }
    if density is not None:
        from lnsgd import curvature
        from lnsgd.sharpness import plot_density

        inputs, targets = evaluation_subset(data, recipe, examples)
        op, dim = curvature.hessian_matvec(model, measured_loss(recipe, data.num_classes, which), inputs, targets)
        gen = torch.Generator(device=dev).manual_seed(seed)
        nodes, weights = curvature.spectral_density(op, dim, hvps, gen)
        out["density"] = str(plot_density(nodes, weights, density, title=f"Hessian spectral density ({which} loss), {path}"))
        out["hvps"] += hvps
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out
