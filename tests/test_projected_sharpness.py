"""Sharpness at the nearest minimizer: `measure-sharpness --project` and `track.sharpness.project`.

References from outside the code under test: a plain full-batch autograd gradient at the
projected point (it must be below the tolerance), a dense Hessian there
(``torch.autograd.functional.hessian``) for the projected readings, and the checkpoint's own
weights before and after (a projection never moves the run).
"""

from __future__ import annotations

import json

import pytest
import torch

from lnsgd.checkpoint import load_checkpoint
from lnsgd.data import load
from lnsgd.errors import RunInterrupted
from lnsgd.recipe import load_recipe
from lnsgd.sharpness import evaluation_subset, measured_loss, project_to_minimizer, training_hook
from lnsgd.track import read_jsonl
from lnsgd.train import train

from .conftest import interrupt_at_epoch, one_line_error, same_weights, strip_timing, weights
from .test_curvature import reference_hessian

SMALL = {"model": {"width": 8}, "data": {"train_size": 120, "test_size": 50}, "train": {"epochs": 3}}
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def small_ckpt(write_recipe, tmp_path):
    train(load_recipe(write_recipe(SMALL)), tmp_path / "small")
    return tmp_path / "small" / "final.pt"


def full_batch_gradient_norm(model, loss_fn, x, y) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def test_measure_sharpness_project_reads_the_dense_hessian_at_a_point_with_zero_gradient(cli, small_ckpt, tmp_path):
    out = tmp_path / "m.json"
    before = weights(small_ckpt)
    # 30 examples: this 8-wide MLP has a minimizer of the smoothed loss on them (on 60 its descent crawls).
    res = cli("measure-sharpness", small_ckpt, "--project", "--project-tol", "1e-5", "--project-steps", "3000", "--examples", "30",
              "--measure", "trace", "--measure", "lambda_max", "--hvps", "60", "--json", out, "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    p = m["projection"]
    assert p["converged"] and p["grad_norm_after"] <= 1e-5 < p["grad_norm_before"] and m["warning"] is None
    assert p["loss_after"] < p["loss_before"] and p["distance"] > 0 and 0 < p["steps"] <= 3000
    assert same_weights(before, weights(small_ckpt))  # the checkpoint is not moved
    assert "at the nearest minimizer" in res.output and "converged" in res.output

    # Rebuild the projected point (the same deterministic descent) and check it from outside.
    model, recipe = load_checkpoint(small_ckpt)
    data = load(recipe)
    x, y = evaluation_subset(data, recipe, 30)
    loss_fn = measured_loss(recipe, data.num_classes, "expected")
    projected, report = project_to_minimizer(model, loss_fn, x, y, tol=1e-5, max_steps=3000, seed=0)
    assert report.distance == pytest.approx(p["distance"], rel=1e-9)
    assert full_batch_gradient_norm(projected, loss_fn, x, y) < 2e-5  # an independent gradient, float32
    eig = torch.linalg.eigvalsh(reference_hessian(projected.double(), loss_fn, x.double(), y))
    assert m["projected"]["trace_hessian"] == pytest.approx(eig.sum().item(), rel=1e-4)
    assert m["projected"]["lambda_max"] == pytest.approx(eig[-1].item(), rel=1e-3)
    # The readings at θ are those of a run without --project.
    plain = tmp_path / "plain.json"
    assert cli("measure-sharpness", small_ckpt, "--measure", "trace", "--measure", "lambda_max", "--hvps", "60", "--examples", "30",
               "--json", plain, "--quiet").exit_code == 0  # fmt: skip
    q = json.loads(plain.read_text())
    assert (m["trace_hessian"], m["lambda_max"]) == (q["trace_hessian"], q["lambda_max"])


def test_a_projection_that_does_not_converge_warns_in_the_output_and_the_json(cli, small_ckpt, tmp_path):
    out = tmp_path / "m.json"
    res = cli("measure-sharpness", small_ckpt, "--project", "--project-steps", "2", "--measure", "trace", "--json", out, "--quiet")
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["projection"]["converged"] is False and m["projection"]["steps"] == 2
    assert m["warning"].startswith("projection did not converge") and "after 2 steps" in m["warning"]
    assert "warning: projection did not converge" in res.output and "NOT converged" in res.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--project-tol", "0"], "--project-tol"), (["--project-tol", "-1"], "--project-tol"), (["--project-steps", "0"], "--project-steps"),
])  # fmt: skip
def test_non_positive_projection_settings_are_one_line(cli, small_ckpt, args, fragment):
    assert fragment in one_line_error(cli("measure-sharpness", small_ckpt, "--project", *args, "--quiet"))


@pytest.mark.parametrize(("key", "value"), [("project_tol", "0"), ("project_tol", "-1e-4"), ("project_steps", "0")])
def test_non_positive_projection_settings_in_a_recipe_are_one_line(cli, write_recipe, key, value):
    line = one_line_error(cli("validate", write_recipe({"track": {"sharpness": {"project": True}}}), f"track.sharpness.{key}={value}"))
    assert f"track.sharpness.{key}" in line


def test_tracking_with_projection_adds_proj_columns_resumes_exactly_and_does_not_touch_training(write_recipe, tmp_path):
    track = {"every": 2, "examples": 30, "hvps": 12, "measures": ["trace", "lambda_max"], "project": True,
             "project_tol": 1e-4, "project_steps": 1500}  # fmt: skip
    extra = {**SMALL, "train": {"epochs": 4, "eval_every": 1}, "track": {"sharpness": track}}
    recipe = load_recipe(write_recipe(extra))
    train(recipe, tmp_path / "a", sharpness_hook=training_hook(recipe))
    rows = read_jsonl(tmp_path / "a/metrics.jsonl")
    measured = [r for r in rows if r.get("sharp/proj_trace_hessian") is not None]
    assert [r["epoch"] for r in measured] == [0, 2, 4]
    for r in measured:
        assert {"sharp/proj_lambda_max", "sharp/proj_steps", "sharp/proj_distance", "sharp/proj_loss", "sharp/proj_loss_before",
                "sharp/proj_grad_norm", "sharp/proj_grad_norm_before", "sharp/proj_converged"} <= r.keys()  # fmt: skip
        assert r["sharp/proj_loss"] <= r["sharp/proj_loss_before"] and r["sharp/proj_converged"] is True
    # The last reading against a dense Hessian at the projection of the final weights.
    model, _ = load_checkpoint(tmp_path / "a/final.pt")
    data = load(recipe)
    x, y = evaluation_subset(data, recipe, 30)
    loss_fn = measured_loss(recipe, data.num_classes, "expected")
    projected, _ = project_to_minimizer(model, loss_fn, x, y, tol=1e-4, max_steps=1500,
                                        seed=_stream_seed(recipe.seed, "sharpness:train:4"))  # fmt: skip
    eig = torch.linalg.eigvalsh(reference_hessian(projected.double(), loss_fn, x.double(), y))
    assert measured[-1]["sharp/proj_trace_hessian"] == pytest.approx(eig.sum().item(), rel=1e-4)

    # Stopped half-way and resumed: the same rows; and the weights of a run that measured nothing.
    with pytest.raises(RunInterrupted):
        train(recipe, tmp_path / "b", sharpness_hook=training_hook(recipe), progress=interrupt_at_epoch(1))
    train(recipe, tmp_path / "b", resume=True, sharpness_hook=training_hook(recipe))
    assert strip_timing(rows) == strip_timing(read_jsonl(tmp_path / "b/metrics.jsonl"))
    train(load_recipe(write_recipe({**SMALL, "train": {"epochs": 4, "eval_every": 1}}, name="plain.yaml")), tmp_path / "c")
    assert same_weights(weights(tmp_path / "a/final.pt"), weights(tmp_path / "c/final.pt"))


def test_a_tracked_projection_that_does_not_converge_warns_on_stderr(write_recipe, tmp_path, capfd):
    track = {"every": 1, "examples": 40, "hvps": 6, "measures": ["trace"], "project": True, "project_steps": 1}
    recipe = load_recipe(write_recipe({**SMALL, "train": {"epochs": 1, "eval_every": 1}, "track": {"sharpness": track}}))
    train(recipe, tmp_path / "a", sharpness_hook=training_hook(recipe))
    err = capfd.readouterr().err
    assert err.count("lnsgd: warning: projection at train epoch") == 2 and "did not converge" in err, err
    assert all(r["sharp/proj_converged"] is False for r in read_jsonl(tmp_path / "a/metrics.jsonl"))


def _stream_seed(seed: int, stream: str) -> int:
    from lnsgd.runtime import stream_seed

    return stream_seed(seed, stream)


def test_a_projection_that_cannot_fit_in_memory_is_one_line_before_any_step(cli, small_ckpt, monkeypatch):
    from lnsgd import sharpness

    before = weights(small_ckpt)
    monkeypatch.setattr(sharpness, "free_memory", lambda device: None)  # the measurement at θ fits
    calls = []
    real = sharpness.project_to_minimizer

    def spy(*args, **kwargs):
        monkeypatch.setattr(sharpness, "free_memory", lambda device: 1000)  # bytes: less than 30 vectors of ~600 floats
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sharpness, "project_to_minimizer", spy)
    line = one_line_error(cli("measure-sharpness", small_ckpt, "--project", "--measure", "trace", "--quiet"))
    assert calls and "the projection keeps 30 vectors" in line and "--project" in line, line
    assert same_weights(before, weights(small_ckpt))


def test_projecting_the_clean_cross_entropy_of_a_fitting_model_warns_that_it_has_no_minimizer(cli, small_ckpt, tmp_path):
    # One-hot targets: once every example is classified right, the loss falls towards 0 only as
    # the logits grow, so ‖∇L‖ ≤ tol is reached at a point the tolerance picks, not on Γ.
    out = tmp_path / "m.json"
    res = cli("measure-sharpness", small_ckpt, "--project", "--loss", "clean", "--examples", "30", "--measure", "trace",
              "--json", out, "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["projection"]["converged"] and m["projection"]["loss_after"] < 0.693 / 30  # every example right
    assert "has no minimizer" in m["warning"] and "flip:0.2" in m["warning"]
    assert "warning: projection: the clean cross-entropy has no minimizer" in res.output
    # The expected loss under flip noise has one: no warning there.
    res = cli("measure-sharpness", small_ckpt, "--project", "--examples", "30", "--project-steps", "3000", "--measure", "trace",
              "--json", out, "--quiet")  # fmt: skip
    assert json.loads(out.read_text())["warning"] is None
