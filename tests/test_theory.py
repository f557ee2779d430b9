"""The theory lab (lnsgd.theory): exact references first, then Theorem 1's claims at small sizes.

Exact references: R against log-determinants and its two limits (Damian, Ma & Lee 2021,
Sec. 6.1), ∂R/∂∇²L against the eigen form and autograd, the explicit model derivatives
against autograd on the nn.Modules, ∇R against finite differences and a closed form.
Claims: one quadratic run (sparse recovery, coupling, stationarity), three short runs
(λ scaling) and one short two-layer run; fixed seeds, sizes picked so each claim holds
with margin (the quadratic claims were checked on run seeds 0–3 while developing).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from lnsgd.curvature.regularizer import RUndefinedError, regularizer
from lnsgd.errors import DivergedError, LnsgdError
from lnsgd.models import QuadraticModel, TwoLayer
from lnsgd.recipe import load_recipe, recipe_from_dict
from lnsgd.theory import (
    ExplicitModel,
    Problem,
    QuadraticExplicit,
    check_theory_recipe,
    explicit_model,
    flat_parameters,
    minibatch_noise_ratio,
    regularizer_derivative,
    regularizer_grad_matrix,
    run_theory,
    summary_table,
)
from lnsgd.track import Progress, read_jsonl

F64 = torch.float64
RECIPES = Path(__file__).parent.parent / "recipes"

# A small sparse-regression problem where the claims hold with margin in ~15 s:
# d = 30, n = 12, w* = 2 ones; GD from v0 = 0.3·1 fits a dense interpolant (recovery error 0.88).
QUADRATIC = {
    "name": "tq",
    "seed": 1,
    "device": "cpu",
    "data": {"name": "synthetic", "synthetic": {"n": 12, "d": 30, "sparsity": 2, "seed": 4}},
    "model": {"name": "quadratic", "init_scale": 0.3},
    "loss": "mse",
    "noise": {"kind": "sign", "sigma": 0.1},
    "optim": {"lr": 0.3, "batch_size": 12},  # λ = ησ²/B = 2.5e-4
    "theory": {"steps": 14000, "eval_every": 1000, "fit_steps": 3000, "fit_lr": 0.2},
}
TWO_LAYER = {
    "name": "t2",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "synthetic", "synthetic": {"n": 10, "d": 5, "teacher": "two_layer", "seed": 0}},
    "model": {"name": "two_layer", "width": 10},
    "loss": "mse",
    "noise": {"kind": "sign", "sigma": 0.05},
    "optim": {"lr": 4.0, "batch_size": 10},  # λ = 1e-3
    "theory": {"steps": 1000, "eval_every": 250, "fit_steps": 2000, "fit_lr": 5.0},
}


def make_recipe(base: dict, tmp: Path, **changes):
    raw = json.loads(json.dumps(base))
    raw["log"] = {"dir": str(tmp)}
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe_from_dict(raw)


class RecordingProgress(Progress):
    def __init__(self):
        self.calls = []

    def start(self, total, done, description, unit="epochs"):
        self.calls.append(("start", total, done, description))

    def advance(self, done, info):
        self.calls.append(("advance", done, dict(info)))

    def stop(self):
        self.calls.append(("stop",))


def spd(p: int, seed: int = 0, top: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))
    evals = torch.linspace(0.05, top, p, dtype=F64)
    return (q * evals) @ q.T


# --------------------------------------------------------------------------- R on fixed matrices


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_R_is_minus_logdet_on_a_fixed_matrix(momentum):
    A, eta = spd(6), 0.7
    c = eta / (2 * (1 + momentum))
    expected = -(1 + momentum) / (2 * eta) * torch.logdet(torch.eye(6, dtype=F64) - c * A)
    assert regularizer(torch.linalg.eigvalsh(A), eta, momentum).item() == pytest.approx(expected.item(), rel=1e-12)


def test_R_is_undefined_past_the_edge_of_stability():
    A, eta = spd(5, top=3.0), 0.7  # η·λ_max = 2.1 > 2
    assert math.isnan(regularizer(torch.linalg.eigvalsh(A), eta).item())
    with pytest.raises(RUndefinedError, match="λ_max"):
        regularizer_grad_matrix(A, eta)
    # heavy-ball momentum widens the bound to 2(1+β)/η
    assert math.isfinite(regularizer(torch.linalg.eigvalsh(A), eta, momentum=0.5).item())


def test_R_tends_to_a_quarter_of_the_trace_as_eta_vanishes():
    A = spd(7)
    for eta, tol in [(1e-3, 1e-3), (1e-6, 1e-6)]:
        assert regularizer(torch.linalg.eigvalsh(A), eta).item() == pytest.approx(A.trace().item() / 4, rel=tol)


def test_R_near_the_edge_of_stability_grows_like_lambda_max_log():
    """η = (2−ν)/λ_max: 2ηR = log(2/ν) + Σ_{i≥2} −log(1 − ηλ_i/2), so R ≈ λ_max·log(2/ν)/4 (paper Sec. 6.1).

    The ratio 4R/(λ_max·log(2/ν)) tends to 1 only like 1/log(1/ν); the remainder is checked exactly.
    """
    evals = torch.tensor([0.1, 0.3, 0.6, 2.0], dtype=F64)
    lam_max, ratios = 2.0, []
    for k in [7, 20, 40]:  # ν = 2^-k keeps 1 − ηλ_max/2 = ν/2 exact in float64
        nu = 2.0**-k
        eta = (2 - nu) / lam_max
        R = regularizer(evals, eta).item()
        rest = -torch.log1p(-eta * evals[:-1] / 2).sum().item()
        assert 2 * eta * R == pytest.approx(math.log(2 / nu) + rest, rel=1e-12)
        ratios.append(4 * R / (lam_max * math.log(2 / nu)))
    assert ratios[0] > ratios[1] > ratios[2] > 1 and ratios[2] < 1.03
    # ... and the remainder tends to its ν = 0 value Σ −log(1 − λ_i/λ_max)
    assert rest == pytest.approx(-torch.log1p(-evals[:-1] / lam_max).sum().item(), rel=1e-9)


def test_dR_dH_matches_the_eigen_form_and_autograd():
    A, eta, beta = spd(6, seed=3, top=2.0), 0.5, 0.3
    M = regularizer_grad_matrix(A, eta, beta)
    evals, U = torch.linalg.eigh(A)
    assert torch.allclose(M, (U * regularizer_derivative(evals, eta, beta)) @ U.T, atol=1e-13)
    S = A.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(regularizer(torch.linalg.eigvalsh(0.5 * (S + S.T)), eta, beta), S)
    assert torch.allclose(M, g, atol=1e-12)


# --------------------------------------------------------------------------- exact derivatives of the models


def _module_problem(name: str):
    torch.manual_seed(0)
    if name == "quadratic":
        module, d = QuadraticModel(7, 0.4).double(), 7
        with torch.no_grad():
            module.v.add_(0.3 * torch.randn(7, dtype=F64))
    else:
        module, d = TwoLayer(4, 5, 1).double(), 4
    x = torch.randn(9, d, dtype=F64)
    y = torch.randn(9, dtype=F64)  # not interpolated: the residual term of ∇²L matters
    return module, explicit_model(module), x, y


@pytest.mark.parametrize("name", ["quadratic", "two_layer"])
def test_explicit_derivatives_match_autograd_on_the_module(name):
    module, model, x, y = _module_problem(name)
    theta = flat_parameters(module)
    shapes = [(k, p.shape) for k, p in module.named_parameters()]

    def f(th):
        params, i = {}, 0
        for k, shape in shapes:
            params[k] = th[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return functional_call(module, params, (x,))[:, 0]

    def loss(th):
        return 0.5 * ((f(th) - y) ** 2).mean()

    problem = Problem(model, x, y)
    assert torch.allclose(model.outputs(theta, x), f(theta), atol=1e-13)
    assert torch.allclose(model.jacobian(theta, x), jacobian(f, theta), atol=1e-12)
    assert torch.allclose(problem.grad(theta), jacobian(loss, theta), atol=1e-12)
    assert torch.allclose(problem.hessian(theta), hessian(loss, theta), atol=1e-12)


@pytest.mark.parametrize("name", ["quadratic", "two_layer"])
def test_grad_R_matches_finite_differences_and_autograd(name):
    module, model, x, y = _module_problem(name)
    theta, eta = flat_parameters(module), 0.3
    problem = Problem(model, x, y)
    g = problem.regularizer_grad(theta, eta)
    # the same gradient by autograd through eigvalsh of the explicit Hessian
    th = theta.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(regularizer(torch.linalg.eigvalsh(problem.hessian(th)), eta), th)
    assert torch.allclose(g, g_auto, atol=1e-11)
    # central differences, float64
    h = 1e-5
    fd = torch.stack([
        (problem.regularizer(theta + h * e, eta) - problem.regularizer(theta - h * e, eta)) / (2 * h)
        for e in torch.eye(len(theta), dtype=F64)
    ])  # fmt: skip
    assert torch.allclose(g, fd, rtol=1e-6, atol=1e-7), (g - fd).abs().max()
    # the autograd fallback of the generic model agrees with the hand-written contraction
    M = regularizer_grad_matrix(problem.hessian(theta), eta)
    generic = ExplicitModel.contraction_grad(model, theta, x, y, M)
    assert torch.allclose(model.contraction_grad(theta, x, y, M), generic, atol=1e-11)


def test_R_and_grad_R_closed_form_on_a_diagonal_quadratic():
    """x_i = √n·e_i: f_i = √n v_i², ∇²L = diag(h), h_i = 4v_i² + 2(√n v_i² − y_i)/√n,
    R = −1/(2η)Σ log(1 − ηh_i/2) and ∂R/∂v_i = ¼·(∂h_i/∂v_i)/(1 − ηh_i/2) = 3v_i/(1 − ηh_i/2)."""
    n, eta = 5, 0.2
    x = math.sqrt(n) * torch.eye(n, dtype=F64)
    v = torch.tensor([0.3, -0.8, 1.1, 0.05, 0.6], dtype=F64)
    y = torch.tensor([0.1, 1.5, 2.0, -0.3, 0.9], dtype=F64)
    problem = Problem(QuadraticExplicit(n), x, y)
    h = 4 * v**2 + 2 * (math.sqrt(n) * v**2 - y) / math.sqrt(n)
    assert torch.allclose(problem.hessian(v), torch.diag(h), atol=1e-13)
    R = -torch.log(1 - eta * h / 2).sum() / (2 * eta)
    assert problem.regularizer(v, eta).item() == pytest.approx(R.item(), rel=1e-12)
    assert torch.allclose(problem.regularizer_grad(v, eta), 3 * v / (1 - eta * h / 2), atol=1e-12)


def test_minibatch_noise_ratio_hand_computed():
    assert minibatch_noise_ratio(0.3, 12, 12, 17.0) == 0
    assert minibatch_noise_ratio(0.3, 6, 12, 17.0) == pytest.approx(0.3 * 6 * 17.0 / (2 * 6 * 11))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"data__name": "digits", "loss": "cross_entropy", "noise__kind": "flip", "noise__p": 0.2}, "data.name=synthetic"),
        ({"noise__kind": "none"}, "noise.kind=sign or gaussian"),
        ({"model__name": "mlp"}, "model.name=quadratic or two_layer"),
        ({"optim__full_batch": True}, "optim.full_batch=false"),
        ({"optim__batch_size": 13}, "optim.batch_size=13"),
    ],
)
def test_bad_recipes_are_refused_in_one_line(tmp_path, changes, fragment):
    recipe = make_recipe(QUADRATIC, tmp_path, **changes)
    with pytest.raises(LnsgdError) as err:
        run_theory(recipe, tmp_path / "run")
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_too_many_parameters_names_the_limit_and_measure_sharpness(tmp_path):
    recipe = make_recipe(QUADRATIC, tmp_path, data__synthetic__d=401, theory__fit_steps=0)
    with pytest.raises(LnsgdError) as err:
        run_theory(recipe, tmp_path / "run")
    assert "401 parameters" in str(err.value) and "theory.max_params=400" in str(err.value)
    assert "lnsgd measure-sharpness" in str(err.value)


def test_step_too_large_for_R_names_lambda_max_and_the_bound(tmp_path):
    recipe = make_recipe(QUADRATIC, tmp_path, optim__lr=0.6)  # λ_max ≈ 3.9 at the start: 2/λ_max ≈ 0.51
    with pytest.raises(LnsgdError) as err:
        run_theory(recipe, tmp_path / "run")
    msg = str(err.value)
    assert "λ_max(∇²L) = 3.9" in msg and "2(1+β)/η = 3.333" in msg and "lower optim.lr below 0.51" in msg
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_needs_force(tmp_path):
    recipe = make_recipe(QUADRATIC, tmp_path, theory__steps=4, theory__eval_every=2, theory__fit_steps=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("x")
    with pytest.raises(LnsgdError, match="--force"):
        run_theory(recipe, tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="not an interpolating start"):
        run_theory(recipe, tmp_path / "run", force=True)
    assert not (tmp_path / "run" / "old.txt").exists()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("theory-*.yaml")), ids=lambda p: p.name)
def test_shipped_theory_recipes_are_runnable(path):
    recipe = load_recipe(path)
    check_theory_recipe(recipe)
    d, w = recipe.data.synthetic.d, recipe.model.width
    p = d if recipe.model.name == "quadratic" else w * d + w
    assert p <= recipe.theory.max_params
    assert path.read_text().startswith("#") and f"lnsgd theory recipes/{path.name}" in path.read_text()


# --------------------------------------------------------------------------- Theorem 1 at small sizes


@pytest.fixture(scope="module")
def quadratic_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("theory")
    progress = RecordingProgress()
    summary = run_theory(make_recipe(QUADRATIC, tmp), tmp / "tq", progress=progress)
    return summary, tmp / "tq", progress


def test_run_folder_and_progress(quadratic_run):
    summary, run_dir, progress = quadratic_run
    for f in ("recipe.yaml", "metrics.jsonl", "summary.json", "theory.png", "iterates.pt"):
        assert (run_dir / f).is_file(), f
    assert json.loads((run_dir / "summary.json").read_text())["lambda"] == pytest.approx(2.5e-4)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(0, 14001, 1000))
    for key in ("lambda", "coupling/distance", "coupling/sqrt_lambda", "label_noise/loss", "label_noise/R",
                "label_noise/stationarity", "label_noise/recovery_error", "plain/stationarity", "phi/R"):  # fmt: skip
        assert key in rows[-1], key
    assert {"recovery_error", "stationarity", "R", "loss"} <= set(summary["label_noise"]) & set(summary["plain"])
    assert {"max_distance", "sqrt_lambda"} <= set(summary["coupling"])
    starts = [c for c in progress.calls if c[0] == "start"]
    assert starts == [("start", 3000, 0, "theory: fit"), ("start", 14000, 0, "theory")]
    assert progress.calls[-1] == ("stop",) and ("advance", 14000) == progress.calls[-2][:2]
    iterates = torch.load(run_dir / "iterates.pt", weights_only=True)
    assert set(iterates) == {"start", "label_noise", "plain", "phi", "w_star"}
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "recovery error" in text and "‖∇(L/λ + R)‖" in text and "√λ" in text


def test_sparse_recovery(quadratic_run):
    """Claim 1: label noise recovers the sparse w*; plain SGD stays at the dense interpolant."""
    summary = quadratic_run[0]
    assert summary["start"]["recovery_error"] > 0.8 and summary["fit"]["loss"] < 1e-20
    assert summary["label_noise"]["recovery_error"] <= 0.1
    assert summary["plain"]["recovery_error"] >= 0.3
    assert summary["phi"]["recovery_error"] <= 0.05


def test_coupling_stays_of_order_sqrt_lambda(quadratic_run):
    """Claim 2: ‖θ_k − Φ_k‖ stays a few √λ over 14000 steps while Φ travels ~40√λ from the start."""
    summary, run_dir, _ = quadratic_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    sqrt_lam = summary["coupling"]["sqrt_lambda"]
    dist = [r["coupling/distance"] / sqrt_lam for r in rows[1:]]
    assert max(dist) < 6
    half = len(dist) // 2
    assert sum(dist[half:]) / len(dist[half:]) < 2 * sum(dist[:half]) / half  # not growing
    assert rows[-1]["coupling/plain_distance"] > 30 * sqrt_lam  # Φ really moved: plain SGD is far behind


def test_stationarity(quadratic_run):
    """Claim 3, read as the theorem predicts: Φ reaches a stationary point of L/λ + R, θ stays √λ-close to it,
    and along the manifold of interpolating solutions the label-noise iterate is near-stationary for R
    while plain SGD's is not. ‖∇(L/λ + R)‖ at θ_k itself is dominated by ∇²L·ξ/λ ~ 1/√λ (ξ ~ √λ, the
    across-valley oscillation), so at θ_k it is *larger* than at plain SGD's iterate; that is checked too."""
    s = quadratic_run[0]
    assert s["phi"]["stationarity"] < s["plain"]["stationarity"] / 15
    assert s["label_noise"]["tangent_stationarity"] < s["plain"]["tangent_stationarity"] / 5
    assert s["label_noise"]["stationarity"] > s["plain"]["stationarity"]
    assert s["label_noise"]["R"] < s["plain"]["R"] / 2


def test_lambda_scaling(tmp_path):
    """Claim 4: same η and σ²/B give the same Φ and land within a few √λ of it; doubling σ²/B regularizes more."""
    sigma = 0.1 * math.sqrt(2)
    short = {"theory__steps": 1000, "theory__eval_every": 100}
    runs = {}
    for key, (s, b) in {"a": (sigma, 6), "b": (sigma * math.sqrt(2), 12), "double": (sigma * math.sqrt(2), 6)}.items():
        recipe = make_recipe(QUADRATIC, tmp_path, noise__sigma=s, optim__batch_size=b, name=key, **short)
        summary = run_theory(recipe, tmp_path / key)
        rows = read_jsonl(tmp_path / key / "metrics.jsonl")
        runs[key] = (summary, torch.load(tmp_path / key / "iterates.pt", weights_only=True), rows)
    (sa, ia, ra), (sb, ib, rb), (sd, idd, rd) = runs["a"], runs["b"], runs["double"]
    assert sa["lambda"] == pytest.approx(sb["lambda"]) and sd["lambda"] == pytest.approx(2 * sa["lambda"])
    sqrt_lam = sa["coupling"]["sqrt_lambda"]
    assert torch.allclose(ia["phi"], ib["phi"], atol=1e-12)  # Φ depends on η and λ only
    assert (ib["label_noise"] - ib["phi"]).norm() < 5 * sqrt_lam
    # B = n/2 adds minibatch-sampling noise (ratio ≈ 0.24 here) that λ = ησ²/B leaves out: a bit farther
    assert (ia["label_noise"] - ia["phi"]).norm() < 8 * sqrt_lam
    assert (idd["phi"] - ia["phi"]).norm() > 10 * sqrt_lam

    def late_R(rows, traj):
        return sum(r[f"{traj}/R"] for r in rows[-3:]) / 3

    assert late_R(rd, "phi") < late_R(ra, "phi") - 0.3
    assert late_R(rd, "label_noise") < min(late_R(ra, "label_noise"), late_R(rb, "label_noise"))


def test_two_layer_tracks_phi_and_flattens(tmp_path):
    recipe = make_recipe(TWO_LAYER, tmp_path)
    s = run_theory(recipe, tmp_path / "t2")
    assert "recovery_error" not in s["label_noise"]
    assert s["coupling"]["max_distance_over_sqrt_lambda"] < 6
    assert s["label_noise"]["R"] < 0.85 * s["plain"]["R"] and s["phi"]["R"] < 0.85 * s["plain"]["R"]
    assert s["label_noise"]["tangent_stationarity"] < s["plain"]["tangent_stationarity"] / 2


def test_heavy_ball_momentum_tracks_heavy_ball_phi(tmp_path):
    """β > 0: λ = ησ²/(B(1−β)), R's momentum form, Φ heavy-ball GD on L + λR with the same β."""
    recipe = make_recipe(QUADRATIC, tmp_path, optim__momentum=0.5, theory__steps=1000, theory__eval_every=250)
    s = run_theory(recipe, tmp_path / "hb")
    assert s["lambda"] == pytest.approx(0.3 * 0.1**2 / (12 * 0.5))
    assert s["coupling"]["max_distance_over_sqrt_lambda"] < 6
    assert s["phi"]["R"] < s["plain"]["R"] - 1


def test_minibatch_instability_is_a_one_line_divergence(tmp_path):
    recipe = make_recipe(QUADRATIC, tmp_path, optim__lr=0.45, optim__batch_size=1, noise__sigma=0.01,
                         theory__steps=100, theory__eval_every=100)  # fmt: skip
    with pytest.raises(DivergedError, match="label-noise SGD diverged by step 100; lower optim.lr"):
        run_theory(recipe, tmp_path / "div")
