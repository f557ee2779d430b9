"""Projection onto Γ (``lnsgd.sharpness.project_to_minimizer``) against references from outside lnsgd.

Linear least squares has closed forms (``torch.linalg.lstsq``, ``torch.linalg.pinv``); at a
tiny MLP's projected point the gradient is taken by plain full-batch autograd and the Hessian
by ``torch.autograd.functional.hessian`` (``reference_hessian`` of test_curvature.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lnsgd import curvature
from lnsgd.errors import LnsgdError
from lnsgd.sharpness import PROJECTION_METHODS, Projection, measure_sharpness, project_to_minimizer

from .test_curvature import reference_hessian

pytestmark = pytest.mark.usefixtures("single_thread")


def regression(n: int, d: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """Gaussian X (n × d), y, and a bias-free linear model with Gaussian weights: all from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))
    return X.to(dtype), y.to(dtype), model


def full_batch_gradient(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """L and ∇L by one plain autograd pass over all examples at once (no chunks, no lnsgd code), in eval mode."""
    training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)
    model.train(training)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("method", PROJECTION_METHODS)
def test_strongly_convex_least_squares_reaches_the_closed_form_minimizer(method):
    X, y, model = regression(40, 6, seed=1)
    projected, r = project_to_minimizer(model, curvature.mse_loss, X, y, tol=1e-11, max_steps=500, method=method, chunk_size=16)
    w_star = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)
    assert r.converged and r.stop_reason == "tolerance" and r.method == method
    torch.testing.assert_close(projected.weight.detach().squeeze(0), w_star, rtol=0, atol=1e-9)
    assert r.loss_after == pytest.approx(0.5 * float((X @ w_star - y).pow(2).mean()), rel=1e-12)
    w0 = model.weight.detach().squeeze(0)
    assert r.loss_before == pytest.approx(0.5 * float((X @ w0 - y).pow(2).mean()), rel=1e-12)
    assert r.grad_norm_before == pytest.approx(float((X.T @ (X @ w0 - y) / 40).norm()), rel=1e-12)
    assert r.distance == pytest.approx(float((w_star - w0).norm()), rel=1e-8)
    # λ_max of ∇²L = XᵀX/n, and the step it sets (step_scale 1).
    assert r.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(X.T @ X / 40)[-1]), rel=1e-10)
    if method == "gd":
        assert r.step_size == pytest.approx(1 / r.lambda_max, rel=1e-12)  # a quadratic never needs a halving
    assert 0 < r.steps <= r.evaluations - 1 and r.hvps == 6  # Lanczos stops at dim products


def test_float32_least_squares_matches_the_float64_closed_form():
    X, y, model = regression(50, 5, seed=2, dtype=torch.float32)
    projected, r = project_to_minimizer(model, curvature.mse_loss, X, y, tol=1e-5)
    w_star = torch.linalg.lstsq(X.double(), y.double().unsqueeze(1)).solution.squeeze(1)
    assert r.converged and projected.weight.dtype == torch.float32
    torch.testing.assert_close(projected.weight.detach().squeeze(0).double(), w_star, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", PROJECTION_METHODS)
def test_overparameterized_least_squares_moves_to_the_nearest_interpolating_point(method):
    X, y, model = regression(8, 30, seed=3)
    w0 = model.weight.detach().squeeze(0).clone()
    projected, r = project_to_minimizer(model, curvature.mse_loss, X, y, tol=1e-12, max_steps=1000, method=method)
    correction = torch.linalg.pinv(X) @ (X @ w0 - y)  # the least-norm correction X⁺(Xθ₀ − y)
    w = projected.weight.detach().squeeze(0)
    assert r.converged
    torch.testing.assert_close(w, w0 - correction, rtol=0, atol=1e-10)
    assert r.distance == pytest.approx(float(correction.norm()), rel=1e-9)
    assert float((X @ w - y).abs().max()) < 1e-10  # it interpolates
    assert r.loss_after < 1e-20


def test_mlp_projection_has_a_small_gradient_and_measured_curvature_matches_a_dense_hessian():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,), generator=gen)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3)).double()  # 83 parameters
    loss_fn = curvature.smoothed_cross_entropy(0.2, 3)
    tol = 1e-6
    projected, r = project_to_minimizer(model, loss_fn, x, labels, tol=tol, max_steps=3000, chunk_size=7)
    assert r.converged and r.method == "lbfgs"

    loss, grad = full_batch_gradient(projected, loss_fn, x, labels)
    assert float(grad.norm()) < tol
    assert r.grad_norm_after == pytest.approx(float(grad.norm()), rel=1e-6, abs=1e-12)
    assert r.loss_after == pytest.approx(loss, rel=1e-12)
    # 83 parameters fit 30 examples: Γ is where every prediction is the smoothed target (0.8, 0.1, 0.1).
    assert loss == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.1)), rel=1e-9)

    eigenvalues = torch.linalg.eigvalsh(reference_hessian(projected, loss_fn, x, labels))
    dim = eigenvalues.numel()
    got = measure_sharpness(
        projected, loss_fn, x, labels, measures=("trace", "lambda_max"), trace_method="xtrace", hvps=2 * dim,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert got["sharp/trace_hessian"] == pytest.approx(float(eigenvalues.sum()), rel=1e-8)
    assert got["sharp/lambda_max"] == pytest.approx(float(eigenvalues[-1]), rel=1e-8)


def test_the_original_model_and_every_generator_are_left_untouched():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(25, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(25, generator=gen, dtype=torch.float64)
    model(x)  # one training-mode pass: running statistics that are not the initial ones
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, gen_state = torch.get_rng_state(), gen.get_state()

    projected, r = project_to_minimizer(model, curvature.mse_loss, x, y, tol=1e-6, max_steps=50)

    assert r.steps > 0 and r.distance > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(gen.get_state(), gen_state)
    assert model.training and all(m.training for m in projected.modules())  # flags restored on the copy too
    moved = projected.state_dict()
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # buffers are not descended
        assert torch.equal(moved[name], before[name])
    assert not any(p is q for p, q in zip(model.parameters(), projected.parameters()))


def test_a_compiled_model_is_projected_through_its_eager_module():
    X, y, model = regression(30, 4, seed=6)
    compiled = torch.compile(model)  # never called: nothing is compiled
    w0 = model.weight.detach().clone()
    projected, r = project_to_minimizer(compiled, curvature.mse_loss, X, y, tol=1e-11)
    assert isinstance(projected, nn.Linear) and r.converged
    torch.testing.assert_close(projected.weight.detach().squeeze(0), torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1))
    assert torch.equal(model.weight, w0)


@pytest.mark.parametrize("method", PROJECTION_METHODS)
def test_a_loss_without_a_finite_minimizer_stops_at_the_cap_without_raising(method):
    # Cross-entropy on linearly separable data: L → 0 only as ‖w‖ → ∞, so ∇L ≠ 0 at every finite point.
    gen = torch.Generator().manual_seed(7)
    labels = torch.arange(40) % 2
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64) + 3.0 * (2 * labels - 1).unsqueeze(1).double()
    model = nn.Linear(2, 2).double()
    projected, r = project_to_minimizer(model, curvature.cross_entropy_loss, x, labels, tol=1e-8, max_steps=5, method=method)
    loss, grad = full_batch_gradient(projected, curvature.cross_entropy_loss, x, labels)
    assert not r.converged and r.stop_reason == "max_steps" and r.steps == 5
    assert r.grad_norm_after > r.tol and float(grad.norm()) > 1e-8
    assert r.loss_after == pytest.approx(loss, rel=1e-12) and loss < r.loss_before
    row = r.as_dict("proj/")
    assert json.loads(json.dumps(row)) == row and row["proj/converged"] is False and row["proj/steps"] == 5
    assert set(row) == {"proj/" + name for name in Projection.__dataclass_fields__}


@pytest.mark.parametrize("method", PROJECTION_METHODS)
def test_descent_that_stalls_at_a_kink_stops_at_the_best_point_without_raising(method):
    # L(w) = (|w − 0| + |2w − 2/3|)/2 is smallest at its kink w = 1/3 (a weighted median), where autograd's
    # gradient is sign(1/3)/2 = 1/2, not 0: no step lowers L, so the line search ends the projection.
    def absolute_error(f, y):
        return (f.squeeze(1) - y).abs().mean()

    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    x, y = torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.tensor([0.0, 2 / 3], dtype=torch.float64)
    projected, r = project_to_minimizer(model, absolute_error, x, y, tol=1e-6, max_steps=500, method=method)
    assert not r.converged and r.stop_reason == "line_search" and r.steps < 500
    assert projected.weight.item() == pytest.approx(1 / 3, abs=1e-15)
    assert r.loss_after == float(absolute_error(projected(x), y).detach()) == pytest.approx(1 / 6, abs=1e-15)
    assert r.grad_norm_after == 0.5 and r.distance == pytest.approx(2 / 3, abs=1e-15)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"tol": 0}, "tol"), ({"tol": -1}, "tol"), ({"tol": float("nan")}, "tol"), ({"max_steps": 0}, "max_steps"),
     ({"max_steps": 2.5}, "max_steps"), ({"method": "adam"}, "method"), ({"step_scale": 2.0}, "step_scale")],
)  # fmt: skip
def test_bad_input_is_one_sentence_naming_the_parameter(kwargs, name):
    X, y, model = regression(5, 2, seed=8)
    with pytest.raises(LnsgdError) as err:
        project_to_minimizer(model, curvature.mse_loss, X, y, **kwargs)
    message = str(err.value)
    assert message.startswith(f"{name} must be") and f"e.g. {name}=" in message and "\n" not in message
