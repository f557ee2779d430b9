"""lnsgd measure-sharpness and sharpness tracked during training, against dense Hessians.

The references come from outside lnsgd: ``torch.autograd.functional.hessian`` and dense
Gauss–Newton matrices from ``torch.func`` Jacobians (the helpers of test_curvature.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lnsgd import curvature
from lnsgd.checkpoint import load_checkpoint
from lnsgd.data import load
from lnsgd.errors import LnsgdError, RunInterrupted
from lnsgd.recipe import load_recipe
from lnsgd.sharpness import evaluation_subset, measure_sharpness, measured_loss
from lnsgd.track import read_jsonl
from lnsgd.train import train

from .conftest import interrupt_at_epoch, one_line_error
from .test_curvature import dense_gauss_newton_trace, reference_hessian

SMALL = {"model": {"width": 8}, "data": {"train_size": 120, "test_size": 50}, "train": {"epochs": 3}}


@pytest.fixture
def small_ckpt(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(SMALL))
    train(recipe, tmp_path / "small")
    return tmp_path / "small" / "final.pt"


def dense_reference(ckpt, which="expected", examples=120):
    """Eigenvalues of the measured loss's Hessian (torch.autograd.functional.hessian) and the recipe."""
    model, recipe = load_checkpoint(ckpt)
    model = model.double()
    data = load(recipe)
    x, y = evaluation_subset(data, recipe, examples)
    H = reference_hessian(model, measured_loss(recipe, data.num_classes, which), x.double(), y)
    return torch.linalg.eigvalsh(H), recipe


def dense_gauss_newton_reference(ckpt, examples=120) -> float:
    """tr G of the checkpoint's cross-entropy-kind loss over the first examples, from dense Jacobians."""
    model, recipe = load_checkpoint(ckpt)
    data = load(recipe)
    x, _ = evaluation_subset(data, recipe, examples)
    return dense_gauss_newton_trace(model.double().eval(), x.double(), "cross_entropy")


def test_measure_sharpness_cli_matches_the_dense_hessian(cli, small_ckpt, tmp_path):
    out = tmp_path / "m.json"
    res = cli("measure-sharpness", small_ckpt, "--hvps", "100", "--top-k", "2", "--json", out, "--quiet")
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    for key in ("trace_hessian", "trace_hessian_stderr", "lambda_max", "top_eigenvalues", "trace_gn", "R", "eta", "momentum",
                "examples", "hvps_per_estimator", "hvps_spent", "hvps", "seconds"):  # fmt: skip
        assert key in m, key
    # --hvps is each estimator's budget; hvps_spent is what λ_max/R and the trace spent together.
    assert m["hvps_per_estimator"] == 100 and m["hvps"] == m["hvps_spent"] >= 100
    assert m["loss"].startswith("flip p=0.2 (smoothed_cross_entropy(p=0.2")  # the expected loss, named by its noise
    eig, recipe = dense_reference(small_ckpt)
    assert m["eta"] == recipe.optim.lr and m["momentum"] == 0.0 and m["examples"] == 120
    # A barely trained net has a flat spectrum: judge the trace by the error bar it reports.
    # The MLP is ReLU without GroupNorm: auto proves every layer linear and returns tr G exactly
    # (float32 checkpoint against a float64 dense Hessian).
    assert m["trace_method"] == "auto:exact" and m["trace_hessian_stderr"] == 0.0 and m["trace_residual"] == 0.0
    assert m["trace_hessian"] == pytest.approx(eig.sum().item(), rel=1e-5)
    assert m["lambda_max"] == pytest.approx(eig[-1].item(), rel=1e-3)
    assert m["top_eigenvalues"][1] == pytest.approx(eig[-2].item(), rel=1e-2)
    exact = curvature.R_exact(eig, m["eta"])
    assert abs(m["R"] - exact) < 4 * m["R_stderr"] and m["R"] == pytest.approx(exact, rel=0.1)
    assert "tr ∇²L (auto:exact)" in res.output and "R(θ)" in res.output
    # tr∇²L = tr G (exact) + tr(∇²L − G); ReLU layers enter linearly, so the residual's
    # true trace is 0 here and tr G alone is the trace.
    assert m["trace_gn_stderr"] == 0.0
    assert m["trace_gn"] == pytest.approx(eig.sum().item(), rel=1e-6)
    trace_gn = dense_gauss_newton_reference(small_ckpt)
    assert m["trace_gn"] == pytest.approx(trace_gn, rel=1e-6)  # the CLI measures in the checkpoint's float32
    assert abs(eig.sum().item() - trace_gn) < 1e-5 * abs(trace_gn)  # the dense residual's trace: 0


def test_measure_sharpness_cli_other_trace_methods(cli, small_ckpt, tmp_path):
    eig, _ = dense_reference(small_ckpt)
    for method in ("split", "xtrace", "hutchinson"):
        out = tmp_path / f"{method}.json"
        res = cli("measure-sharpness", small_ckpt, "--measure", "trace", "--trace-method", method, "--json", out, "--quiet")
        assert res.exit_code == 0, res.output
        m = json.loads(out.read_text())
        assert m["trace_method"] == method and m["trace_gn"] is None
        assert (m["trace_residual"] is None) == (method != "split")
        assert abs(m["trace_hessian"] - eig.sum().item()) < 4 * m["trace_hessian_stderr"]


class PairProducts(nn.Module):
    """f(x)ⱼ = aⱼ·bⱼ·xⱼ. At a = b = 1, x = 1, y = 2 under ½‖f − y‖² each pair's Hessian block is
    [[b², 2ab − y], [2ab − y, a²]] = I, its Gauss–Newton block [[1, 1], [1, 1]] and the residual
    (ab − y)·[[0, 1], [1, 0]] = −[[0, 1], [1, 0]]."""

    def __init__(self, pairs: int):
        super().__init__()
        self.a = nn.Parameter(torch.ones(pairs, dtype=torch.float64))
        self.b = nn.Parameter(torch.ones(pairs, dtype=torch.float64))

    def forward(self, x):
        return self.a * self.b * x


class Untraceable(nn.Module):
    """``inner`` behind a branch on a tensor's value, which torch.fx cannot trace: linearity
    cannot be proven, so trace_method="auto" falls back to its pilot."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) if bool(x.numel()) else x


@pytest.mark.parametrize("case", ["residual vanishes", "hessian is the identity"])
def test_auto_trace_probes_the_operator_the_construction_determines(case):
    """The pilot of trace_method="auto" probes the operator whose zᵀAz has the smaller sample variance.

    - A linear model: ∇²f = 0, so ∇²L − G is the zero operator and every pilot zᵀ(∇²L − G)z is 0:
      the split can never lose, and tr G (exact) is the whole trace.
    - PairProducts at its balanced point: ∇²L = I, so zᵀ∇²Lz = ‖z‖² = dim for every Rademacher z
      (variance 0), while zᵀ(∇²L − G)z = −2Σⱼ z_aⱼz_bⱼ varies (variance 8·pairs): ∇²L itself wins.
    """
    # Both models are linear in each parameter tensor (tr(∇²L − G) = 0): fx-traceable, auto
    # returns tr G exactly; behind Untraceable, the pilot decides as before.
    if case == "residual vanishes":
        g = torch.Generator().manual_seed(0)
        traceable = nn.Linear(5, 3).double()
        x, y = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
        loss_fn, expected = curvature.smoothed_cross_entropy(0.2, 3), "auto:split"
    else:
        traceable, pairs = PairProducts(32), 32
        x, y = torch.ones(1, pairs, dtype=torch.float64), torch.full((1, pairs), 2.0, dtype=torch.float64)
        loss_fn, expected = curvature.mse_loss, "auto:hessian"
    model = Untraceable(traceable)
    H = reference_hessian(model, loss_fn, x, y)
    exact = float(torch.trace(H))
    out = measure_sharpness(traceable, loss_fn, x, y, measures=("trace",), hvps=100, generator=torch.Generator().manual_seed(0))
    assert out["trace_method"] == "auto:exact" and out["hvps_spent"] == 0 and out["sharp/trace_hessian_stderr"] == 0.0
    assert out["sharp/trace_hessian"] == pytest.approx(exact, rel=1e-10)
    if case == "hessian is the identity":
        torch.testing.assert_close(H, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-15)
    for seed in range(5):
        out = measure_sharpness(model, loss_fn, x, y, measures=("trace",), hvps=100, trace_method="auto",
                                generator=torch.Generator().manual_seed(seed))  # fmt: skip
        assert out["trace_method"] == expected, (seed, out["trace_method"])
        assert out["sharp/trace_hessian"] == pytest.approx(exact, rel=1e-9)
        if case == "residual vanishes":
            assert out["trace_residual"] == 0.0 and out["sharp/trace_hessian_stderr"] == 0.0


def test_clean_loss_and_eta_override(cli, small_ckpt, tmp_path):
    out = tmp_path / "m.json"
    eig, _ = dense_reference(small_ckpt, which="clean")
    eta = 1.0 / eig[-1].item()  # ηλ_max/2 = 0.5
    res = cli("measure-sharpness", small_ckpt, "--loss", "clean", "--eta", str(eta), "--momentum", "0.5", "--measure", "R",
              "--hvps", "100", "--json", out, "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["loss"].startswith("clean") and m["trace_hessian"] is None
    exact = curvature.R_exact(eig, eta, 0.5)
    assert abs(m["R"] - exact) < 4 * m["R_stderr"] and m["R"] == pytest.approx(exact, rel=0.1)


def test_density_figure(cli, small_ckpt, tmp_path):
    res = cli("measure-sharpness", small_ckpt, "--measure", "lambda_max", "--hvps", "30", "--density", tmp_path / "d.png", "--quiet")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--examples", "0"], "--examples 0"),
        (["--examples", "100000"], "training set size"),
        (["--hvps", "2"], "hvps"),
        (["--eta", "0"], "--eta"),
        (["--eta", "-1"], "--eta"),
        (["--momentum", "1.0"], "--momentum"),
        (["--eta", "1000", "--measure", "R"], "undefined"),
        (["--loss", "noisy"], "--loss"),
        (["--trace-method", "pyhessian"], "--trace-method"),
    ],
)
def test_measure_bad_input(cli, small_ckpt, args, fragment):
    assert fragment in one_line_error(cli("measure-sharpness", small_ckpt, *args, "--quiet"))


def test_measure_missing_or_corrupt_checkpoint(cli, tmp_path):
    assert "does not exist" in one_line_error(cli("measure-sharpness", tmp_path / "nope.pt", "--quiet"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    assert "corrupt" in one_line_error(cli("measure-sharpness", bad, "--quiet"))


def test_sharpness_tracked_during_training_and_resume_matches(write_recipe, tmp_path):
    extra = {**SMALL, "train": {"epochs": 4, "eval_every": 1},
             "track": {"sharpness": {"every": 2, "examples": 60, "hvps": 12, "measures": ["trace", "lambda_max", "R"]}}}  # fmt: skip
    recipe = load_recipe(write_recipe(extra))
    from lnsgd.sharpness import training_hook

    train(recipe, tmp_path / "a", sharpness_hook=training_hook(recipe))
    rows = read_jsonl(tmp_path / "a/metrics.jsonl")
    measured = [r["epoch"] for r in rows if r.get("sharp/trace_hessian") is not None]
    assert measured == [0, 2, 4]
    assert all(r.get("sharp/R") is not None and r["sharp/lambda_max"] > 0 for r in rows if r["epoch"] in measured)

    with pytest.raises(RunInterrupted):
        train(recipe, tmp_path / "b", sharpness_hook=training_hook(recipe), progress=interrupt_at_epoch(1))
    train(recipe, tmp_path / "b", resume=True, sharpness_hook=training_hook(recipe))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time_s", "throughput/img_per_s")} for r in rs]  # noqa: E731
    assert strip(rows) == strip(read_jsonl(tmp_path / "b/metrics.jsonl"))
    # Measuring does not disturb training: same weights as a run without tracking.
    train(load_recipe(write_recipe({**SMALL, "train": {"epochs": 4, "eval_every": 1}}, name="plain.yaml")), tmp_path / "c")
    a = torch.load(tmp_path / "a/final.pt", weights_only=True)["model"]
    c = torch.load(tmp_path / "c/final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_train_cli_uses_track_sharpness(cli, write_recipe, tmp_path):
    extra = {**SMALL, "name": "tracked", "train": {"epochs": 2}, "track": {"sharpness": {"every": 1, "examples": 50, "hvps": 8}}}
    assert cli("train", write_recipe(extra), "--quiet").exit_code == 0
    rows = read_jsonl(tmp_path / "runs/tracked/metrics.jsonl")
    # The expected loss, named by its noise model.
    assert all(r["sharp/trace_hessian"] is not None and r["sharp/loss"] == "flip p=0.2" for r in rows)


def test_products_run_with_tf32_off_and_the_setting_comes_back():
    """A checkpoint measures the same wherever it is measured: TF32 is off inside every product."""
    import torch
    from torch import nn

    from lnsgd.losses import cross_entropy_loss
    from lnsgd.sharpness import measure_sharpness

    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return self.lin(x)

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        torch.manual_seed(0)
        measure_sharpness(Recording(), cross_entropy_loss, torch.randn(8, 4), torch.randint(0, 3, (8,)), measures=("trace",),
                          hvps=6, trace_method="hutchinson", generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert seen and all(s == (False, False) for s in seen), seen
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_measurement_that_cannot_fit_and_out_of_memory_are_one_line(monkeypatch):
    import torch

    from lnsgd import sharpness
    from lnsgd.losses import cross_entropy_loss

    # 11,173,962 parameters (ResNet18) × (8 + 2·60) vectors × 4 bytes = 5.3 GiB, by hand:
    assert sharpness.vector_bytes(11_173_962, 60, ("trace", "lambda_max")) == 128 * 11_173_962 * 4
    monkeypatch.setattr(sharpness, "free_memory", lambda device: 1000)  # bytes: less than (8 + 10) × 15 × 4
    model = torch.nn.Linear(4, 3)
    with pytest.raises(LnsgdError, match="--hvps"):
        sharpness.measure_sharpness(model, cross_entropy_loss, torch.randn(8, 4), torch.randint(0, 3, (8,)), hvps=10,
                                    measures=("lambda_max",), generator=torch.Generator())  # fmt: skip
    monkeypatch.setattr(sharpness, "free_memory", lambda device: None)

    def oom(out, y):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    oom.kind = "cross_entropy"
    with pytest.raises(LnsgdError, match="out of memory.*--examples.*--hvps.*chunk_size"):
        sharpness.measure_sharpness(model, oom, torch.randn(8, 4), torch.randint(0, 3, (8,)), measures=("trace",), hvps=6,
                                    trace_method="hutchinson", generator=torch.Generator())  # fmt: skip


@pytest.mark.parametrize("method", ["hutchinson", "xtrace"])
def test_rtol_stops_early_within_its_error_and_none_spends_the_budget(method):
    """On a dense matrix with a known trace: rtol spends fewer products, and the answer is within a few standard errors."""
    from lnsgd.sharpness import adaptive_trace

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    eig = 1.0 + torch.rand(300, generator=g, dtype=torch.float64)  # a flat spectrum: probes converge slowly, steadily
    A = q @ torch.diag(eig) @ q.T
    truth = float(eig.sum())
    spent = []

    def estimate(m):
        spent.append(m)
        return curvature.estimate_trace(A, 300, m, g, method=method)

    est = adaptive_trace(estimate, 400, rtol=0.02)
    assert sum(spent) < 400 and len(spent) >= 1
    assert est.stderr <= 0.02 * abs(est.value)
    assert abs(est.value - truth) < 4 * est.stderr + 1e-9
    spent.clear()
    full = adaptive_trace(estimate, 400, rtol=None)
    assert spent == [400] and full.num_matvecs == 400


def test_rtol_bad_values_are_one_line(cli, write_recipe):
    from .conftest import one_line_error

    assert "rtol" in one_line_error(cli("validate", write_recipe({"track": {"sharpness": {"rtol": 1.5}}})))
    assert "--rtol" in one_line_error(cli("measure-sharpness", "nothing.pt", "--rtol", "0"))


@pytest.mark.parametrize(("noise", "which", "label"), [
    ({"kind": "flip", "p": 0.2}, "expected", "flip p=0.2"), ({"kind": "none", "p": 0.0}, "expected", "clean"),
    ({"kind": "none", "p": 0.0}, "flip:0.2", "flip p=0.2"), ({"kind": "flip", "p": 0.2}, "clean", "clean"),
    ({"kind": "smooth", "p": 0.3}, "expected", "flip p=0.3"),
])  # fmt: skip
def test_the_measured_loss_can_be_pinned_and_is_named_by_what_it_is(write_recipe, noise, which, label):
    from lnsgd.recipe import load_recipe
    from lnsgd.sharpness import measured_loss, measured_loss_label

    recipe = load_recipe(write_recipe({"noise": noise, "track": {"sharpness": {"loss": which}}}))
    assert measured_loss_label(recipe, recipe.track.sharpness.loss) == label
    # Against the hand-written expectation over flip noise: (1 − p)·CE(y) + p/(C−1)·Σ_{c≠y} CE(c).
    logits, y = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64), torch.tensor([0])
    logp = torch.log_softmax(logits, -1)[0]
    p = float(label.split("=")[1]) if label.startswith("flip") else 0.0
    expected = -((1 - p) * logp[0] + p / 2 * (logp[1] + logp[2]))
    assert float(measured_loss(recipe, 3, which)(logits, y)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("bad", ["flip:1.5", "flip:0", "gaussian:-1", "noisy", "flip"])
def test_a_measured_loss_that_is_not_a_noise_model_is_one_line(cli, write_recipe, bad):
    line = one_line_error(cli("validate", write_recipe(), f"track.sharpness.loss={bad}"))
    assert "track.sharpness.loss" in line and "flip:P" in line
