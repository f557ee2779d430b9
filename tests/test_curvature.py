"""Curvature operators and estimators against exact references.

References, all computed outside lnsgd: dense Hessians of tiny float64 models
(``torch.autograd.functional.hessian`` of the loss as a function of one flat
parameter vector), dense Gauss–Newton matrices from per-example Jacobians
(``torch.func.jacrev``) with the output Hessians written out here, and dense
matrices with a known spectrum Q·diag(λ)·Qᵀ. Seeds are fixed, so every number checked
here is deterministic; the tolerances are the accuracy the estimators claim.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian

from lnsgd import curvature as cv
from lnsgd.curvature import gauss_newton
from lnsgd.curvature.operators import rademacher
from lnsgd.errors import LnsgdError
from lnsgd.sharpness import measure_sharpness, plot_density


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: thread start-up costs more than it saves, and on a shared
    # 2-core machine oversubscription made each HVP ~15x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_hessian(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇²L of the mean loss over (x, y) by ``torch.autograd.functional.hessian`` of the loss as a
    function of one flat vector of the trainable parameters (``named_parameters()`` order), in
    eval mode: no lnsgd code on the way."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        pieces = [t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes, strict=True)]
        params = {n: t for (n, _), t in zip(named, pieces, strict=True)}
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return hessian(loss_of, flat)
    finally:
        for m, training in modes:
            m.training = training


def mlp(d: int = 6, h: int = 12, out: int = 3, norm: str = "none") -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d, h)]
    if norm == "groupnorm":
        layers.append(nn.GroupNorm(3, h))
    elif norm == "batchnorm":
        layers.append(nn.BatchNorm1d(h))
    layers += [nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, out)]
    return nn.Sequential(*layers).double()


def init_(model: nn.Module, g: torch.Generator, scale: float = 1.0) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[-1] ** 0.5)
    return model


def teacher_data(n: int, d: int, out: int, kind: str, g: torch.Generator):
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, out, generator=g, dtype=torch.float64)
    y = (x @ w).argmax(1) if kind == "cross_entropy" else (x @ w).tanh()
    return x, y


def fit(model, loss_fn, x, y, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def trained():
    """A tanh MLP (279 parameters) fit for 100 Adam steps to 96 teacher-labelled
    points: partway to a minimizer, so its Hessian has outliers, a bulk and a few
    small negative eigenvalues, like the networks the tool measures."""
    g = gen(0)
    model = init_(mlp(), g)
    x, y = teacher_data(96, 6, 3, "cross_entropy", g)
    fit(model, cv.cross_entropy_loss, x, y, steps=100)
    H = reference_hessian(model, cv.cross_entropy_loss, x, y)
    eigenvalues = torch.linalg.eigvalsh(H)
    op, dim = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y)
    return dict(model=model, x=x, y=y, H=H, eigenvalues=eigenvalues, op=op, dim=dim)


def known_spectrum(dim: int = 300, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Q·diag(λ)·Qᵀ with a power-law decay and a few small negative eigenvalues."""
    g = gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = 10.0 * torch.arange(1, dim + 1, dtype=torch.float64) ** -1.2
    lam[-10:] = -0.02 * torch.arange(1, 11, dtype=torch.float64)
    return (Q * lam) @ Q.T, lam.sort(descending=True).values


# --------------------------------------------------------------------------- public API


def test_the_package_exports_its_api_and_the_losses_of_lnsgd_losses():
    import lnsgd.losses

    assert sorted(cv.__all__) == sorted([
        "CrossEntropyLoss", "HessianOperator", "LanczosResult", "MSELoss", "REstimate", "RUndefinedError", "R_exact",
        "SplitTraceEstimate", "SmoothedCrossEntropy", "TraceEstimate", "choose_trace", "cross_entropy_loss",
        "dense_hessian", "estimate_R", "estimate_trace", "evaluation_mode", "exact_split", "exact_trace_gauss_newton", "flatten_params",
        "hessian_matvec", "is_piecewise_linear", "lanczos", "loss_kind", "mse_loss", "residual_matvec", "ritz_pairs",
        "smoothed_cross_entropy",
        "spectral_density", "split_trace", "top_eigenvalues", "trace_gauss_newton", "trace_hessian",
    ])  # fmt: skip
    homes = {f"lnsgd.curvature.{m}" for m in ("operators", "trace", "lanczos", "regularizer", "gauss_newton", "linearity")}
    for name in cv.__all__:  # each defined in the module that owns its job (the losses in lnsgd.losses)
        assert getattr(cv, name).__module__ in homes | {"lnsgd.losses"}, name
    for name in ("CrossEntropyLoss", "MSELoss", "SmoothedCrossEntropy", "cross_entropy_loss", "mse_loss", "smoothed_cross_entropy"):
        assert getattr(cv, name) is getattr(lnsgd.losses, name), name


# --------------------------------------------------------------------------- operator


@pytest.mark.parametrize("norm", ["none", "groupnorm", "batchnorm"])
def test_hessian_matvec_in_chunks_and_dense_hessian_equal_the_autograd_hessian(norm):
    g = gen(3)
    model = init_(mlp(d=5, h=6, norm=norm), g)
    if norm == "batchnorm":
        bn = model[1]
        bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    x, y = teacher_data(23, 5, 3, "cross_entropy", g)
    model.train()  # the operator must measure in eval mode and put this back
    buffers = [b.clone() for b in model.buffers()]
    H = reference_hessian(model, cv.cross_entropy_loss, x, y)
    # lnsgd's own dense Hessian (torch.func, reverse over reverse) is checked here once.
    torch.testing.assert_close(cv.dense_hessian(model, cv.cross_entropy_loss, x, y), H, rtol=0, atol=1e-12)
    op, dim = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y, chunk_size=7)
    assert dim == sum(p.numel() for p in model.parameters()) == H.shape[0]
    assert torch.allclose(H, H.T, atol=1e-12)
    for _ in range(3):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        torch.testing.assert_close(op(v), H @ v, rtol=0, atol=1e-10)
    assert all(m.training for m in model.modules())
    for before, after in zip(buffers, model.buffers(), strict=True):
        assert torch.equal(before, after)  # eval-mode BatchNorm leaves running stats alone


def test_cached_graph_is_rebuilt_after_an_in_place_update():
    g = gen(9)
    model = init_(mlp(d=4, h=5), g)
    x, y = teacher_data(12, 4, 3, "cross_entropy", g)
    op, dim = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y)  # one chunk: cached
    assert op.cache_graph
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op(v), reference_hessian(model, cv.cross_entropy_loss, x, y) @ v, rtol=0, atol=1e-12)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # what an optimizer step does
    torch.testing.assert_close(op(v), reference_hessian(model, cv.cross_entropy_loss, x, y) @ v, rtol=0, atol=1e-12)


def test_compiled_models_are_measured_through_their_eager_module():
    g = gen(10)
    model = init_(mlp(d=4, h=5), g)
    x, y = teacher_data(12, 4, 3, "cross_entropy", g)
    compiled = torch.compile(model, backend="aot_eager")  # no double backward through this
    op, dim = cv.hessian_matvec(compiled, cv.cross_entropy_loss, x, y)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op(v), reference_hessian(model, cv.cross_entropy_loss, x, y) @ v, rtol=0, atol=1e-12)


def test_hessian_matvec_matches_a_hand_computed_hessian():
    # Linear regression, mean ½(wᵀx − y)²: the Hessian is XᵀX/n, exactly.
    g = gen(4)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    op, dim = cv.hessian_matvec(model, cv.mse_loss, x, y, chunk_size=3)
    torch.testing.assert_close(torch.stack([op(e) for e in torch.eye(dim, dtype=torch.float64)]), x.T @ x / 10)


def test_hessian_operator_converts_dtype_and_respects_frozen_parameters():
    g = gen(5)
    model = init_(mlp(d=4, h=5), g)
    model[0].weight.requires_grad_(False)
    x, y = teacher_data(9, 4, 3, "cross_entropy", g)
    op, dim = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y)
    assert dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cv.flatten_params(model).shape == (dim,)
    v = torch.randn(dim, generator=g)
    assert op(v).dtype == torch.float32  # answered in the caller's dtype
    H = reference_hessian(model, cv.cross_entropy_loss, x, y)  # over the trainable parameters only
    with torch.no_grad():  # works even when the caller disabled autograd
        torch.testing.assert_close(op(v.double()), H @ v.double())


def test_models_with_dropout_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(LnsgdError, match="nondeterministic HVPs"):
        cv.hessian_matvec(model, cv.cross_entropy_loss, x, y)
    with pytest.raises(LnsgdError, match="nondeterministic HVPs"):
        cv.trace_gauss_newton(model, cv.cross_entropy_loss, x, y)
    model[1].p = 0.0
    cv.hessian_matvec(model, cv.cross_entropy_loss, x, y)  # p=0 is harmless


def test_operator_input_is_validated():
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(LnsgdError, match="targets"):
        cv.hessian_matvec(model, cv.cross_entropy_loss, x, y[:4])
    with pytest.raises(LnsgdError, match="chunk_size"):
        cv.hessian_matvec(model, cv.cross_entropy_loss, x, y, chunk_size=0)
    op, dim = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y)
    with pytest.raises(LnsgdError, match="length 8"):
        op(torch.zeros(dim + 1))


# --------------------------------------------------------------------------- trace


def test_xtrace_is_within_one_percent_at_100_hvps_and_beats_hutchinson(trained):
    # Many seeds on the dense Hessian (the HVP operator equals it to 1e-10, see
    # above); test_measure_sharpness repeats one estimate through real HVPs.
    exact = float(trained["eigenvalues"].sum())
    errors = {}
    for method in ("xtrace", "hutchinson"):
        errors[method] = statistics.median(
            abs(cv.estimate_trace(trained["H"], trained["dim"], 100, gen(s), method=method).value - exact) / exact
            for s in range(10)
        )
    assert errors["xtrace"] < 0.01
    assert errors["xtrace"] < errors["hutchinson"] / 3


def test_trace_methods_on_a_known_spectrum_with_calibrated_stderr():
    A, lam = known_spectrum()
    exact = float(lam.sum())
    for method in ("hutchinson", "hutchpp", "xtrace"):
        estimates = [cv.estimate_trace(A, 300, 60, gen(s), method=method) for s in range(8)]
        assert all(e.method == method and e.num_matvecs == 60 for e in estimates)
        # The reported standard error describes the actual error.
        z = [abs(e.value - exact) / e.stderr for e in estimates]
        assert max(z) < 4.5, (method, z)
    default = cv.estimate_trace(A, 300, 100, gen(0))
    assert default.method == "xtrace" and abs(default.value - exact) / exact < 0.01
    # Callables and dense tensors are interchangeable.
    same = cv.estimate_trace(lambda v: A @ v, 300, 100, gen(0), dtype=torch.float64)
    assert same.value == pytest.approx(default.value, rel=1e-12)


def test_trace_sketch_larger_than_dim_is_exact():
    A, lam = known_spectrum(dim=20)
    est = cv.estimate_trace(A, 20, 60, gen(0))
    assert est.num_matvecs == 40  # no more than dim test vectors
    assert est.value == pytest.approx(float(lam.sum()), rel=1e-10)


@pytest.mark.parametrize(("method", "minimum"), [("hutchinson", 2), ("hutchpp", 4), ("xtrace", 4)])
def test_trace_refuses_too_few_matvecs(method, minimum):
    A, _ = known_spectrum(dim=30)
    with pytest.raises(LnsgdError, match=f"num_matvecs must be an integer ≥ {minimum}"):
        cv.estimate_trace(A, 30, minimum - 1, gen(0), method=method)
    cv.estimate_trace(A, 30, minimum, gen(0), method=method)


def test_trace_refuses_bad_method_and_shapes():
    A, _ = known_spectrum(dim=30)
    with pytest.raises(LnsgdError, match="method must be one of"):
        cv.estimate_trace(A, 30, 10, method="girard")
    with pytest.raises(LnsgdError, match="shape"):
        cv.estimate_trace(A, 31, 10)
    with pytest.raises(LnsgdError, match="length dim=30"):
        cv.estimate_trace(lambda v: v[:-1], 30, 10)


# --------------------------------------------------------------------------- eigenvalues


def test_lambda_max_to_1e_4_in_30_hvps(trained):
    lam = trained["eigenvalues"]
    for seed in range(3):
        top = cv.top_eigenvalues(trained["op"], trained["dim"], k=1, num_matvecs=30, generator=gen(seed))
        assert abs(float(top[0]) - float(lam[-1])) / float(lam[-1]) < 1e-4


def test_top_k_on_a_known_spectrum_and_lanczos_invariants():
    A, lam = known_spectrum()
    top = cv.top_eigenvalues(A, 300, k=5, num_matvecs=60, generator=gen(0))
    assert top.dtype == torch.float64 and top.shape == (5,)
    torch.testing.assert_close(top, lam[:5], rtol=1e-8, atol=0)
    alphas, betas, Q = cv.lanczos(A, 300, 40, gen(0))
    assert alphas.shape == betas.shape == (40,) and Q.shape == (300, 40)
    torch.testing.assert_close(Q.T @ Q, torch.eye(40, dtype=torch.float64), atol=1e-12, rtol=0)
    T = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    torch.testing.assert_close(Q.T @ A @ Q, T, atol=1e-10, rtol=0)


def test_lanczos_restarts_on_breakdown_to_find_repeated_eigenvalues():
    # Three distinct eigenvalues: a Krylov space from one start has dimension 3.
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen(6), dtype=torch.float64))
    lam = torch.tensor([5.0] * 4 + [2.0] * 4 + [1.0] * 4, dtype=torch.float64)
    top = cv.top_eigenvalues((Q * lam) @ Q.T, 12, k=4, num_matvecs=12, generator=gen(0))
    torch.testing.assert_close(top, torch.full((4,), 5.0, dtype=torch.float64))


def test_top_eigenvalues_validates_k():
    A, _ = known_spectrum(dim=30)
    with pytest.raises(LnsgdError, match="k must be"):
        cv.top_eigenvalues(A, 30, k=10, num_matvecs=5)


# --------------------------------------------------------------------------- R(θ)


def test_R_exact_closed_form_limits_and_momentum():
    lam = torch.tensor([3.0, 1.0, 0.5, -0.2], dtype=torch.float64)
    eta = 0.4
    by_hand = -1 / (2 * eta) * sum(torch.log(1 - eta / 2 * lam)).item()
    assert cv.R_exact(lam, eta) == pytest.approx(by_hand, rel=1e-14)
    # η → 0: R → tr∇²L / 4.
    assert cv.R_exact(lam, 1e-8) == pytest.approx(float(lam.sum()) / 4, rel=1e-6)
    # Momentum β: −(1+β)/(2η)·tr log(I − η/(2(1+β))·H), by hand (β = 0.8 makes η = 0.9 act as 0.5).
    with_momentum = -(1 + 0.8) / (2 * 0.9) * sum(torch.log(1 - 0.9 / (2 * (1 + 0.8)) * lam)).item()
    assert cv.R_exact(lam, 0.9, momentum=0.8) == pytest.approx(with_momentum, rel=1e-14)
    with pytest.raises(cv.RUndefinedError, match="undefined"):
        cv.R_exact(lam, 2 / 3.0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("half_eta_lambda", [0.5, 0.95])
def test_R_within_two_percent_at_100_hvps(trained, momentum, half_eta_lambda):
    lam = trained["eigenvalues"]
    eta = half_eta_lambda * 2 * (1 + momentum) / float(lam[-1])
    exact = cv.R_exact(lam, eta, momentum)
    estimates = [cv.estimate_R(trained["H"], trained["dim"], eta, momentum, 100, gen(s)) for s in range(10)]
    assert all(e.num_matvecs <= 100 for e in estimates)
    assert statistics.median(abs(e.value - exact) / exact for e in estimates) < 0.02
    assert estimates[0].lambda_max == pytest.approx(float(lam[-1]), rel=1e-6)


def test_R_on_a_known_spectrum_beats_undeflated_quadrature():
    A, lam = known_spectrum(dim=400)
    eta = 0.95 * 2 / float(lam[0])
    exact = cv.R_exact(lam, eta)
    deflated = [abs(cv.estimate_R(A, 400, eta, 0.0, 100, gen(s)).value - exact) / exact for s in range(6)]
    # Plain SLQ (no deflation: the first run is one probe's worth of budget).
    plain = [
        abs(cv.estimate_R(A, 400, eta, 0.0, 100, gen(s), first_run=1, slq_max_steps=10).value - exact) / exact for s in range(6)
    ]
    assert statistics.median(deflated) < 0.02
    assert statistics.median(deflated) < statistics.median(plain) / 3


def test_R_is_exact_when_the_krylov_space_fills_the_space():
    A, lam = known_spectrum(dim=40)
    est = cv.estimate_R(A, 40, 0.5 * 2 / float(lam[0]), 0.0, 60, gen(0))
    assert est.num_deflated == 40 and est.stderr == 0.0
    assert est.value == pytest.approx(cv.R_exact(lam, 0.5 * 2 / float(lam[0])), rel=1e-10)


def test_R_refuses_bad_eta_momentum_and_budget():
    A, lam = known_spectrum(dim=50)
    bound = 2 / float(lam[0])
    with pytest.raises(LnsgdError, match="eta"):
        cv.estimate_R(A, 50, 0.0)
    with pytest.raises(LnsgdError, match="eta"):
        cv.estimate_R(A, 50, -0.1)
    with pytest.raises(LnsgdError, match=r"momentum \(β\) must be a number in \[0, 1\)"):
        cv.estimate_R(A, 50, 0.1, momentum=1.0)
    with pytest.raises(LnsgdError, match="momentum"):
        cv.estimate_R(A, 50, 0.1, momentum=-0.1)
    with pytest.raises(LnsgdError, match="num_matvecs must be an integer ≥ 10"):
        cv.estimate_R(A, 50, 0.1, num_matvecs=9)
    with pytest.raises(cv.RUndefinedError) as info:
        cv.estimate_R(A, 50, 1.01 * bound, num_matvecs=30, generator=gen(0))
    assert "R(θ) is undefined" in str(info.value) and f"{bound:.6g}" in str(info.value)
    assert info.value.bound == pytest.approx(bound, rel=1e-8)
    # With momentum the bound is 2(1+β)/λ_max: the same η is then fine.
    cv.estimate_R(A, 50, 1.01 * bound, momentum=0.9, num_matvecs=30, generator=gen(0))


# --------------------------------------------------------------------------- Gauss–Newton


def dense_gauss_newton(model, x, kind: str) -> torch.Tensor:
    """G = (1/n)·Σᵢ Jᵢᵀ Hᵢ Jᵢ from dense per-example Jacobians."""
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def output(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(params, x)
    J = torch.cat([jac[n].reshape(x.shape[0], -1, params[n].numel()) for n in names], dim=2)
    out = model(x).detach()
    lam = torch.eye(out.shape[1], dtype=out.dtype).expand(len(x), -1, -1) if kind == "mse" else (
        torch.diag_embed(out.softmax(1)) - out.softmax(1)[:, :, None] * out.softmax(1)[:, None, :])  # fmt: skip
    return torch.einsum("nkd,nkl,nle->de", J, lam, J) / len(x)


def dense_gauss_newton_trace(model, x, kind: str) -> float:
    return float(torch.trace(dense_gauss_newton(model, x, kind)))


@pytest.mark.parametrize(
    ("loss", "per_class"), [("cross_entropy", None), ("cross_entropy", False), ("smoothed", None), ("mse", None)]
)
def test_trace_gauss_newton_matches_dense_jacobians(loss, per_class):
    g = gen(7)
    model = init_(mlp(d=5, h=8), g, scale=1.5)
    kind = "mse" if loss == "mse" else "cross_entropy"
    x, y = teacher_data(30, 5, 3, kind, g)
    loss_fn = {"cross_entropy": cv.cross_entropy_loss, "smoothed": cv.smoothed_cross_entropy(0.2, 3), "mse": cv.mse_loss}[loss]
    exact = dense_gauss_newton_trace(model, x, kind)
    est = cv.trace_gauss_newton(
        model,
        loss_fn,
        x,
        y,
        num_samples=300 if per_class is False or loss == "mse" else 60,
        generator=gen(0),
        chunk_size=8,
        per_class=per_class,
    )
    assert est.stderr < 0.1 * exact  # the check below has teeth
    assert abs(est.value - exact) < 4 * est.stderr, (est, exact)


def test_trace_gauss_newton_needs_a_loss_kind():
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(LnsgdError, match="kind"):
        cv.trace_gauss_newton(model, lambda f, t: F.cross_entropy(f, t), x, y)


def relu_cnn(norm: str = "none", dims: int = 1) -> nn.Module:
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    def gn(c: int) -> nn.Module:
        if norm == "groupnorm":
            return nn.GroupNorm(2, c)
        if norm == "batchnorm":
            return nn.BatchNorm1d(c) if dims == 1 else nn.BatchNorm2d(c)
        return nn.Identity()

    return nn.Sequential(
        conv(1, 4, 3, padding=1), gn(4), nn.ReLU(), conv(4, 4, 3, stride=2, padding=1), gn(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 ** dims, 6), nn.ReLU(), nn.Linear(6, 3),
    ).double()  # fmt: skip


def warm_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        model.train()
        model(x)
    return model.eval()


@pytest.mark.parametrize("loss", ["cross_entropy", "smoothed", "mse"])
@pytest.mark.parametrize("arch", ["tanh-mlp", "groupnorm-mlp", "cnn1d", "batchnorm-cnn1d", "groupnorm-cnn2d", "shared-linear"])
def test_exact_trace_gauss_newton_equals_the_dense_gauss_newton_trace(arch, loss):
    g = gen(11)
    if arch.endswith("mlp"):
        model = init_(mlp(d=8, h=6, norm="groupnorm" if arch.startswith("groupnorm") else "none"), g, scale=1.5)
        x = torch.randn(25, 8, generator=g, dtype=torch.float64)
    elif arch == "shared-linear":  # one nn.Linear called twice: not a "ghost" layer
        shared = nn.Linear(8, 8)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(8, 3)).double()
        init_(model, g, scale=1.5)
        x = torch.randn(25, 8, generator=g, dtype=torch.float64)
    else:
        dims = 2 if arch.endswith("2d") else 1
        model = init_(relu_cnn(arch.split("-")[0] if "-" in arch else "none", dims), g, scale=1.5)
        x = torch.randn(25, 1, *([8] * dims), generator=g, dtype=torch.float64)
        warm_batchnorm(model, x)
    kind = "mse" if loss == "mse" else "cross_entropy"
    y = torch.randn(25, 3, generator=g, dtype=torch.float64) if kind == "mse" else torch.randint(0, 3, (25,), generator=g)
    loss_fn = {"cross_entropy": cv.cross_entropy_loss, "smoothed": cv.smoothed_cross_entropy(0.2, 3), "mse": cv.mse_loss}[loss]
    # On a copy: functional_call corrupts a model with tied parameters (see lnsgd/curvature/gauss_newton.py).
    exact = dense_gauss_newton_trace(copy.deepcopy(model), x, kind)
    for chunk_size in (25, 7):
        est = cv.exact_trace_gauss_newton(model, loss_fn, x, y, chunk_size=chunk_size)
        assert est.value == pytest.approx(exact, rel=1e-10) and est.stderr == 0.0
    # The tiniest Jacobian budget: one example per block.
    assert cv.exact_trace_gauss_newton(model, loss_fn, x, y, max_jacobian_elements=1).value == pytest.approx(exact, rel=1e-10)


def dense_gauss_newton_trace_from_jacobians(model, x, kind: str) -> float:
    """tr G from dense per-example Jacobians, without forming G (for models too big for d × d)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def output(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(params, x)
    J = torch.cat([jac[n].reshape(x.shape[0], -1, params[n].numel()) for n in params], dim=2)
    p = model(x).detach().softmax(1)
    lam = torch.eye(p.shape[1], dtype=p.dtype).expand(len(x), -1, -1) if kind == "mse" else (
        torch.diag_embed(p) - p[:, :, None] * p[:, None, :])  # fmt: skip
    return float(torch.einsum("nkd,nkl,nld->", J, lam, J)) / len(x)


class InPlaceResidual(nn.Module):
    """Strided, dilated and biased convolutions, an in-place ReLU right after a
    convolution and an in-place residual sum: the cases a hook on a layer's output
    could get wrong."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.norm = nn.GroupNorm(2, 4)
        self.valid = nn.Conv1d(4, 3, 2, padding="valid", bias=False)
        self.fc = nn.Linear(3 * 15, 3)

    def forward(self, x):
        x = self.act(self.stem(x))
        out = self.conv(x)
        out += x
        out = self.act(self.norm(out))
        return self.fc(torch.tanh(self.valid(out.flatten(2))).flatten(1))


def test_exact_trace_gauss_newton_through_in_place_ops_strides_and_dilations():
    g = gen(21)
    model = init_(InPlaceResidual().double(), g, scale=1.5)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    exact = dense_gauss_newton_trace(copy.deepcopy(model), x, "cross_entropy")
    for loss_fn in (cv.cross_entropy_loss, cv.smoothed_cross_entropy(0.2, 3)):
        assert cv.exact_trace_gauss_newton(model, loss_fn, x, y, chunk_size=5).value == pytest.approx(exact, rel=1e-10)


def test_exact_trace_gauss_newton_of_a_grouped_convolution():
    # groups > 1 is not read off the input: those weights take per-example Jacobians.
    g = gen(22)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16, 3)
    ).double()
    init_(model, g, scale=1.5)
    x = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    exact = dense_gauss_newton_trace(copy.deepcopy(model), x, "cross_entropy")
    assert cv.exact_trace_gauss_newton(model, cv.cross_entropy_loss, x, y).value == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("norm", ["groupnorm", "batchnorm"])
def test_exact_trace_gauss_newton_of_a_resnet18(norm):
    from lnsgd.models import ResNet18

    torch.manual_seed(0)
    model = ResNet18(3, 4, width=2, norm_kind=norm, group_size=2).double()
    g = gen(23)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=g)
    warm_batchnorm(model, x)
    exact = dense_gauss_newton_trace_from_jacobians(model, x, "cross_entropy")
    est = cv.exact_trace_gauss_newton(model, cv.smoothed_cross_entropy(0.2, 4), x, y, chunk_size=4)
    assert est.value == pytest.approx(exact, rel=1e-10)


def test_exact_trace_gauss_newton_of_a_conv_net_takes_no_per_example_jacobians(monkeypatch):
    # Every layer of a GroupNorm ReLU CNN is read off its inputs: no vmap(jacrev) at all,
    # which is what lets tr G at 11M parameters cost about C gradients.
    g = gen(24)
    model = init_(relu_cnn("groupnorm", 2), g, scale=1.5)
    x = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    exact = dense_gauss_newton_trace(copy.deepcopy(model), x, "cross_entropy")

    def refuse(*args, **kwargs):
        raise AssertionError("per-example Jacobians were taken")

    monkeypatch.setattr(gauss_newton, "_rest_grams", refuse)
    assert cv.exact_trace_gauss_newton(model, cv.cross_entropy_loss, x, y).value == pytest.approx(exact, rel=1e-10)


def test_exact_trace_gauss_newton_without_vmap(monkeypatch):
    # A model torch.func cannot batch falls back to one backward per example and output.
    g = gen(12)
    model = init_(relu_cnn(), g, scale=1.5)
    x = torch.randn(10, 1, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    exact = dense_gauss_newton_trace(model, x, "cross_entropy")

    def refuse(*args, **kwargs):
        raise RuntimeError("vmap: not supported")

    monkeypatch.setattr(torch.func, "vmap", refuse)
    assert cv.exact_trace_gauss_newton(model, cv.cross_entropy_loss, x, y).value == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("norm", ["none", "groupnorm"])
def test_residual_operator_is_the_hessian_minus_the_gauss_newton_matrix(norm):
    g = gen(13)
    model = init_(mlp(d=5, h=6, norm=norm), g, scale=1.5)
    x, y = teacher_data(20, 5, 3, "cross_entropy", g)
    loss_fn = cv.smoothed_cross_entropy(0.3, 3)
    H = reference_hessian(model, loss_fn, x, y)
    G = dense_gauss_newton(model, x, "cross_entropy")
    op, dim = cv.residual_matvec(model, loss_fn, x, y, chunk_size=6)
    A = torch.stack([op(e) for e in torch.eye(dim, dtype=torch.float64)], 1)
    torch.testing.assert_close(A, H - G, rtol=1e-9, atol=1e-11)
    assert float(torch.trace(H - G)).__abs__() > 1e-3  # tanh layers: a real residual trace


def test_relu_networks_have_a_hessian_trace_equal_to_the_gauss_newton_trace():
    # Each layer enters a ReLU network linearly (BatchNorm in eval mode is affine),
    # so the residual's diagonal blocks vanish and tr∇²L = tr G exactly, at any θ.
    # With GroupNorm the normalization is nonlinear in the weights before it.
    g = gen(14)
    x = torch.randn(20, 1, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    loss_fn = cv.smoothed_cross_entropy(0.2, 3)
    for norm, zero in (("none", True), ("batchnorm", True), ("groupnorm", False)):
        model = warm_batchnorm(init_(relu_cnn(norm), g, scale=1.5), x)
        H = reference_hessian(model, loss_fn, x, y)
        residual = float(torch.trace(H)) - cv.exact_trace_gauss_newton(model, loss_fn, x, y).value
        assert (abs(residual) < 1e-10 * float(torch.trace(H)).__abs__()) == zero, (norm, residual)


class ResidualReLUMLP(nn.Module):
    """x ↦ W₃·relu(x₁ + W₂·relu(x₁)), x₁ = W₁x: a ReLU MLP with a skip connection."""

    def __init__(self, d: int = 5, h: int = 7, out: int = 3):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, out)

    def forward(self, x):
        x = self.inp(x)
        return self.out(F.relu(x + self.hidden(torch.relu(x))))


class TanhOnLinear(nn.Module):
    """Only nn.Linear submodules, but torch.tanh between them: not linear in the first layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def piecewise_linear_cases():
    """(name, model, x, y): ReLU networks in which every parameter tensor enters linearly."""
    from lnsgd.models import ResNet18

    g = gen(31)
    cnn = warm_batchnorm(init_(relu_cnn("batchnorm", 2), g, scale=1.5), torch.randn(20, 1, 8, 8, generator=g, dtype=torch.float64))
    torch.manual_seed(0)
    x4 = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    resnet = warm_batchnorm(ResNet18(3, 4, width=2, norm_kind="batchnorm", group_size=2).double(), x4)
    # The dense reference of all 11,318 parameters takes a minute: the wide convolutions of
    # layer3/layer4 are frozen (constants of the model), the other ~1,400 parameters measured.
    for p in resnet.parameters():
        p.requires_grad_(p.numel() <= 300)
    return [
        ("relu-cnn2d-batchnorm", cnn, torch.randn(20, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)),
        ("resnet18-batchnorm", resnet, x4, torch.randint(0, 4, (6,), generator=g)),
        ("residual-relu-mlp", init_(ResidualReLUMLP().double(), g, 1.5), torch.randn(20, 5, generator=g, dtype=torch.float64),
         torch.randint(0, 3, (20,), generator=g)),
    ]  # fmt: skip


def test_auto_is_exact_on_piecewise_linear_networks():
    # tr∇²L from the dense Hessian equals auto's tr G with no residual probe and stderr 0.
    for name, model, x, y in piecewise_linear_cases():
        loss_fn = cv.smoothed_cross_entropy(0.2, int(y.max()) + 1 if name != "resnet18-batchnorm" else 4)
        exact = float(torch.trace(reference_hessian(model, loss_fn, x, y)))
        assert cv.is_piecewise_linear(model), name
        est = cv.trace_hessian(model, loss_fn, x, y, 40, gen(0))
        assert est.method == "auto:exact" and est.stderr == 0.0 and est.num_matvecs == 0 and est.residual == 0.0, name
        assert est.value == pytest.approx(exact, rel=1e-10, abs=1e-12), name
        out = measure_sharpness(model, loss_fn, x, y, measures=("trace",), hvps=40, generator=gen(0))
        assert out["trace_method"] == "auto:exact" and out["hvps_spent"] == 0, name
        assert out["sharp/trace_hessian"] == pytest.approx(exact, rel=1e-10, abs=1e-12), name


def test_models_that_are_not_piecewise_linear_are_never_labelled_exact():
    g = gen(32)
    shared = nn.Linear(5, 5)
    tied = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(5, 3)).double()
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    loss_fn = cv.smoothed_cross_entropy(0.2, 3)
    cases = [
        ("tanh on Linear outputs", init_(TanhOnLinear().double(), g, 1.5), x),
        ("a weight used twice", init_(tied, g, 1.5), x),
        ("GroupNorm", init_(relu_cnn("groupnorm"), g, 1.5), torch.randn(20, 1, 8, generator=g, dtype=torch.float64)),
        ("GELU", nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3)).double(), x),
        ("softmax inside", nn.Sequential(nn.Linear(5, 3), nn.Softmax(1), nn.Linear(3, 3)).double(), x),
        ("LayerNorm", nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).double(), x),
    ]  # fmt: skip
    # Eval mode normalizes by the batch's statistics: nonlinear (and examples interact).
    assert not cv.is_piecewise_linear(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.ReLU()))
    for name, model, xs in cases:
        assert not cv.is_piecewise_linear(model), name
        est = cv.trace_hessian(model, loss_fn, xs, y, 40, gen(0))
        assert est.method != "auto:exact" and est.num_matvecs > 0, name
    # The guards are real: for the first three the dense residual's trace is not 0.
    for name, model, xs in cases[:3]:
        H = reference_hessian(copy.deepcopy(model), loss_fn, xs, y)
        residual = float(torch.trace(H)) - cv.exact_trace_gauss_newton(model, loss_fn, xs, y).value
        assert abs(residual) > 1e-6 * abs(float(torch.trace(H))), name


@pytest.mark.parametrize("cache", ["cached", "uncached", "auto"])
def test_chunked_hvps_with_and_without_the_graph_cache_equal_the_dense_hessian(cache):
    g = gen(33)
    model = init_(mlp(d=5, h=6), g, scale=1.5)
    x, y = teacher_data(30, 5, 3, "cross_entropy", g)
    H = reference_hessian(model, cv.cross_entropy_loss, x, y)
    kwargs = {"cached": {"cache_graph": True}, "uncached": {"cache_graph": False}, "auto": {}}[cache]
    op, dim = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y, chunk_size=7, **kwargs)  # 5 chunks
    for seed in range(3):
        v = torch.randn(dim, generator=gen(seed), dtype=torch.float64)
        torch.testing.assert_close(op(v), H @ v, rtol=0, atol=1e-10)
    assert op.cache_graph == (cache != "uncached")


def test_the_graph_cache_is_kept_across_chunks_within_its_memory_bound():
    g = gen(34)
    model = init_(mlp(d=5, h=6), g, scale=1.5)
    x, y = teacher_data(30, 5, 3, "cross_entropy", g)
    H = reference_hessian(model, cv.cross_entropy_loss, x, y)
    v = torch.randn(H.shape[0], generator=gen(0), dtype=torch.float64)
    roomy, _ = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y, chunk_size=7, cache_bytes=2**30)
    tight, _ = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y, chunk_size=7, cache_bytes=1000)
    assert roomy.cache_graph is None and tight.cache_graph is None  # decided on the first product
    for op in (roomy, tight):
        torch.testing.assert_close(op(v), H @ v, rtol=0, atol=1e-10)
        torch.testing.assert_close(op(v), H @ v, rtol=0, atol=1e-10)
    # One chunk's graph holds at least its 7×5 float64 inputs and the gradients (dim values).
    assert roomy.graph_bytes == tight.graph_bytes >= 5 * (7 * 5 + H.shape[0]) * 8
    assert roomy.cache_graph is True and tight.cache_graph is False
    assert roomy._cache is not None and len(roomy._cache[1]) == 5 and tight._cache is None
    # One chunk: cached as before, whatever the bound (its graph is a single product's peak anyway).
    one, _ = cv.hessian_matvec(model, cv.cross_entropy_loss, x, y, cache_bytes=0)
    assert one.cache_graph is True


@pytest.fixture(scope="module")
def fitted_relu():
    """A ReLU MLP (two hidden layers of 24 and 12, 471 parameters) fit to
    120 teacher-labelled points near a minimizer of the flip-noise expected loss,
    where label-noise SGD goes (100% train accuracy), measured on that loss."""
    g = gen(15)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    init_(model, g)
    x, y = teacher_data(120, 6, 3, "cross_entropy", g)
    loss_fn = cv.smoothed_cross_entropy(0.2, 3)
    fit(model, loss_fn, x, y, steps=400)
    assert (model(x).argmax(1) == y).all()
    return model.eval(), x, y, loss_fn, reference_hessian(model, loss_fn, x, y)


def test_trace_hessian_is_more_accurate_than_hutchinson_at_a_minimizer(fitted_relu):
    model, x, y, loss_fn, H = fitted_relu
    exact, dim = float(torch.trace(H)), H.shape[0]
    split = [cv.trace_hessian(model, loss_fn, x, y, 40, gen(s), method="split") for s in range(6)]
    hutch = [cv.estimate_trace(H, dim, 60, gen(s), method="hutchinson").value for s in range(40)]
    rms = lambda errs: (sum(e * e for e in errs) / len(errs)) ** 0.5  # noqa: E731
    split_rms = rms([s.value - exact for s in split])
    assert all(s.method == "split" and s.num_matvecs == 40 for s in split)
    # The parts against dense references: tr G exactly; the residual's true trace is 0 (ReLU).
    trace_gn = dense_gauss_newton_trace(model, x, "cross_entropy")
    assert all(s.trace_gn == pytest.approx(trace_gn, rel=1e-10) for s in split)
    assert all(abs(s.residual - (exact - trace_gn)) < 4 * s.stderr for s in split)
    assert split_rms < 0.001 * exact
    # 40 residual products (+ tr G, cheaper than 20 HVPs here) against 60 HVPs:
    # measured 0.009% against 4.7%.
    assert split_rms * 5 < rms([h - exact for h in hutch])
    assert all(abs(s.value - exact) < 4 * s.stderr for s in split)


def test_trace_hessian_is_within_one_percent_where_the_residual_is_real():
    # GroupNorm + tanh: the residual has a real trace, which the probes estimate.
    g = gen(16)
    model = init_(mlp(d=6, h=12, norm="groupnorm"), g)
    x, y = teacher_data(96, 6, 3, "cross_entropy", g)
    fit(model, cv.cross_entropy_loss, x, y, steps=100)
    loss_fn = cv.smoothed_cross_entropy(0.2, 3)
    exact = float(torch.trace(reference_hessian(model, loss_fn, x, y)))
    errors = [abs(cv.trace_hessian(model, loss_fn, x, y, 100, gen(s), method="split").value - exact) / abs(exact) for s in range(5)]
    assert statistics.median(errors) < 0.01, errors


def test_choose_trace_probes_the_less_noisy_operator_and_stays_unbiased():
    # A = G + R on dense matrices with a known trace. A small residual: the split is
    # chosen; a residual far noisier than A (R ≈ −G + small): A itself is chosen.
    g = gen(17)
    n = 200
    B = torch.randn(n, 40, generator=g, dtype=torch.float64)
    G = B @ B.T / 40
    noise = torch.randn(n, n, generator=g, dtype=torch.float64)
    noise = (noise + noise.T) / 2
    def probe_variance(M):  # Var zᵀMz over Rademacher z = 2·Σ_{i≠j} M_ij² (M symmetric)
        return 2 * float(M.pow(2).sum() - M.diagonal().pow(2).sum())

    for R, expected in ((0.02 * noise, "auto:split"), (-G + 0.05 * noise + 3.0 * torch.eye(n, dtype=torch.float64), "auto:hessian")):
        A = G + R
        exact = float(torch.trace(A))
        # The construction decides: the chosen operator's zᵀMz is the far quieter one.
        quiet, loud = (R, A) if expected == "auto:split" else (A, R)
        assert probe_variance(quiet) * 10 < probe_variance(loud)
        runs = [cv.choose_trace(A, R, n, float(torch.trace(G)), 100, gen(s)) for s in range(30)]
        assert all(r.num_matvecs <= 100 for r in runs)
        # The pilot (4 probes of each) compares noisy variances: rarely, it picks wrong.
        assert sum(r.method == expected for r in runs) >= 27, [r.method for r in runs]
        # The parts against the dense references: tr G is carried exactly, the residual estimates tr R.
        assert all(r.trace_gn == float(torch.trace(G)) for r in runs)
        residual_mean = statistics.mean(r.residual for r in runs)
        residual_spread = statistics.stdev(r.residual for r in runs) / len(runs) ** 0.5
        assert abs(residual_mean - float(torch.trace(R))) < 4 * residual_spread + 1e-9 * abs(exact)
        mean = statistics.mean(r.value for r in runs)
        spread = statistics.stdev(r.value for r in runs) / len(runs) ** 0.5
        assert abs(mean - exact) < 4 * spread + 1e-9 * abs(exact), (expected, mean, exact, spread)
    # Too few products for a pilot: the residual is probed directly.
    assert cv.choose_trace(G, 0.02 * noise, n, float(torch.trace(G)), 9, gen(0)).method == "auto:split"


def test_split_trace_needs_a_loss_kind():
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    # Each message names the caller's own argument: trace_hessian's fix is estimate_trace(..., method='xtrace'),
    # measure_sharpness's is trace_method='xtrace' (the CLI's --trace-method is a layer above both).
    with pytest.raises(LnsgdError, match="kind") as raised:
        cv.trace_hessian(model, lambda f, t: F.cross_entropy(f, t), x, y, 10)
    assert "method='xtrace'" in str(raised.value) and "trace_method" not in str(raised.value)
    for fn in (cv.exact_trace_gauss_newton, cv.trace_gauss_newton):
        with pytest.raises(LnsgdError, match="kind") as raised:
            fn(model, lambda f, t: F.cross_entropy(f, t), x, y)
        assert "trace_method" not in str(raised.value)
    with pytest.raises(LnsgdError, match="trace_method='xtrace'"):
        measure_sharpness(model, lambda f, t: F.cross_entropy(f, t), x, y, measures=("trace",), generator=gen(0))
    with pytest.raises(LnsgdError, match="trace_method"):
        measure_sharpness(model, cv.cross_entropy_loss, x, y, trace_method="pyhessian", generator=gen(0))


# --------------------------------------------------------------------------- density


def test_spectral_density_is_a_probability_measure_on_the_spectrum(tmp_path):
    A, lam = known_spectrum()
    nodes, weights = cv.spectral_density(A, 300, 80, gen(0), num_probes=4)
    assert nodes.shape == weights.shape == (80,)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-10)
    assert float(nodes.max()) <= float(lam[0]) + 1e-9 and float(nodes.min()) >= float(lam[-1]) - 1e-9
    # Gauss quadrature with 20 nodes is exact for polynomials of degree < 40, so the
    # density's moments are those of the probes: Σ w·θᵏ = mean over probes of zᵀAᵏz / dim.
    g = gen(0)
    Z = torch.stack([rademacher((300,), g, torch.float64, "cpu") for _ in range(4)], dim=1)
    for k in (1, 2, 5):
        moment = float((Z * (torch.linalg.matrix_power(A, k) @ Z)).sum() / (4 * 300))
        assert float((weights * nodes**k).sum()) == pytest.approx(moment, rel=1e-8)
    path = plot_density(nodes, weights, tmp_path / "density.png", "known spectrum")
    assert path.stat().st_size > 1000


# --------------------------------------------------------------------------- measure_sharpness


def test_measure_sharpness_agrees_with_the_references(trained):
    model, x, y, lam = trained["model"], trained["x"], trained["y"], trained["eigenvalues"]
    model.train()
    calls = []
    eta = 0.5 * 2 / float(lam[-1])
    out = measure_sharpness(
        model,
        cv.cross_entropy_loss,
        x,
        y,
        hvps=100,
        top_k=3,
        eta=eta,
        generator=gen(0),
        chunk_size=40,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert model.training
    assert out["sharp/trace_hessian"] == pytest.approx(float(lam.sum()), rel=0.01)
    assert out["sharp/lambda_max"] == pytest.approx(float(lam[-1]), rel=1e-6)
    assert out["sharp/top_eigenvalues"] == pytest.approx(lam.flip(0)[:3].tolist(), rel=1e-4)
    assert out["sharp/R"] == pytest.approx(cv.R_exact(lam, eta), rel=0.02)
    exact_gn = dense_gauss_newton_trace(model, x, "cross_entropy")
    assert out["sharp/trace_gn"] == pytest.approx(exact_gn, rel=1e-10) and out["sharp/trace_gn_stderr"] == 0.0
    assert 150 <= out["hvps"] <= 200 and out["examples"] == 96 and out["seconds"] > 0
    assert calls[-1][0] == calls[-1][1] and len(calls) >= out["hvps"]


def test_measure_sharpness_with_undefined_R():
    g = gen(8)
    model = init_(mlp(d=4, h=5), g)
    x, y = teacher_data(20, 4, 3, "cross_entropy", g)
    kwargs = dict(measures=("R",), hvps=20, eta=1e3, generator=gen(0))
    with pytest.raises(LnsgdError, match="R\\(θ\\) is undefined"):
        measure_sharpness(model, cv.cross_entropy_loss, x, y, **kwargs)
    out = measure_sharpness(model, cv.cross_entropy_loss, x, y, skip_undefined_R=True, **kwargs)
    assert out["sharp/R"] is None and out["sharp/lambda_max"] > 2 / 1e3
    with pytest.raises(LnsgdError, match="eta"):
        measure_sharpness(model, cv.cross_entropy_loss, x, y, measures=("R",), generator=gen(0))
    with pytest.raises(LnsgdError, match="measures"):
        measure_sharpness(model, cv.cross_entropy_loss, x, y, measures=("flatness",), generator=gen(0))


def test_measure_sharpness_in_float32_and_through_a_float32_copy_of_bf16(trained):
    lam = trained["eigenvalues"]
    x, y = trained["x"].float(), trained["y"]
    for dtype in (torch.float32, torch.bfloat16):
        model = mlp().to(dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in trained["model"].state_dict().items()})
        out = measure_sharpness(model, cv.cross_entropy_loss, x, y, measures=("trace", "lambda_max"), hvps=100, generator=gen(0))
        assert next(model.parameters()).dtype == dtype  # the caller's model is untouched
        rel = 0.02 if dtype == torch.float32 else 0.2  # bf16 weights are themselves ~0.4% off
        assert out["sharp/trace_hessian"] == pytest.approx(float(lam.sum()), rel=rel)
        assert out["sharp/lambda_max"] == pytest.approx(float(lam[-1]), rel=rel)
        assert "sharp/R" not in out and "sharp/trace_gn" not in out


def test_a_compiled_model_is_measured_through_its_eager_function():
    # Compiled graphs do not support the double backward every HVP needs; a
    # torch.compile'd module is measured eagerly (torch.compiler.set_stance), same parameters.
    g = gen(31)
    model = init_(mlp(d=5, h=6), g, scale=1.5)
    x, y = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    loss_fn = cv.smoothed_cross_entropy(0.2, 3)
    H = reference_hessian(model, loss_fn, x, y)
    compiled = torch.compile(model)
    op, dim = cv.hessian_matvec(compiled, loss_fn, x, y)
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    exact = dense_gauss_newton_trace(model, x, "cross_entropy")
    assert cv.exact_trace_gauss_newton(compiled, loss_fn, x, y).value == pytest.approx(exact, rel=1e-10)
