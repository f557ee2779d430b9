"""Poor global minimizers: the replica generator, stop rules, and both init commands end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lnsgd.data import load
from lnsgd.errors import LnsgdError
from lnsgd.inits import _fits, adversarial_phases, replica_labels, replica_masks, replicated_set
from lnsgd.recipe import load_recipe
from lnsgd.track import read_jsonl

from .conftest import interrupt_at_epoch, one_line_error


def test_replica_labels_are_deterministic_and_uniform():
    idx = torch.arange(50_000)
    r = torch.full_like(idx, 3)
    a = replica_labels(7, r, idx, 10)
    assert torch.equal(a, replica_labels(7, r, idx, 10))  # a pure function of (seed, replica, index)
    assert not torch.equal(a, replica_labels(8, r, idx, 10))
    assert not torch.equal(a, replica_labels(7, r + 1, idx, 10))
    counts = torch.bincount(a, minlength=10).double()
    chi2 = ((counts - 5000) ** 2 / 5000).sum().item()
    assert chi2 < 27.9  # χ²(9) at p = 0.999
    # Independent of the true labels' order: agreement with another replica is at chance.
    agree = (a == replica_labels(7, r + 1, idx, 10)).double().mean().item()
    assert abs(agree - 0.1) < 0.01


def test_replica_masks_zero_exactly_the_fraction():
    idx = torch.arange(200)
    r = torch.zeros_like(idx)
    m = replica_masks(0, r, idx, 1024, 0.1)
    assert m.shape == (200, 1024)
    assert (m.sum(1) == round(0.1 * 1024)).all()
    assert torch.equal(m, replica_masks(0, r, idx, 1024, 0.1))
    assert not torch.equal(m, replica_masks(0, r + 1, idx, 1024, 0.1))
    # Every location is hit about equally often (no fixed pattern).
    per_location = replica_masks(0, torch.zeros(20000, dtype=torch.long), torch.arange(20000), 64, 0.25).double().mean(0)
    assert (per_location - 0.25).abs().max() < 0.03
    assert replica_masks(0, r, idx, 64, 0.0).sum() == 0


def test_replicated_set_zeros_pixels_in_every_channel(write_recipe):
    recipe = load_recipe(write_recipe(), ["init.adversarial.replicas=3", "init.adversarial.zero_fraction=0.25"])
    data = load(recipe)
    ts = replicated_set(data, recipe)
    n = len(data.train_x)
    assert ts.n == 3 * n
    idx = torch.tensor([0, n, 2 * n + 5])
    x, y = ts.fetch(idx)
    raw = data.train_x[torch.tensor([0, 0, 5])].clone()
    zero_norm = data.normalize(torch.zeros_like(raw))
    zeroed = torch.isclose(x, zero_norm) & (raw != 0)  # locations that were non-zero and now read as 0
    assert zeroed.flatten(1).sum(1).le(16).all()  # 25% of 64 locations
    assert (x == zero_norm).flatten(1).sum(1).ge(16).all()
    assert torch.equal(y, ts.labels(idx))
    x2, y2 = ts.fetch(idx)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_stop_rule():
    rule = _fits(1e-3, classification=True)
    assert rule({"train/acc": 1.0, "train/loss": 5e-4})
    assert not rule({"train/acc": 0.999, "train/loss": 5e-4})
    assert not rule({"train/acc": 1.0, "train/loss": 2e-3})
    assert _fits(1e-3, classification=False)({"train/loss": 1e-4, "train/acc": None})


def test_init_fullbatch_end_to_end(cli, write_recipe, tmp_path):
    path = write_recipe({"name": "fb", "noise": {"kind": "none", "p": 0.0}, "optim": {"lr": 0.5},
                         "train": {"epochs": 400, "eval_every": 20}, "init": {"stop_loss": 0.05},
                         "data": {"train_size": 100}})  # fmt: skip
    res = cli("init-fullbatch", path, "--quiet")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "runs/fb/summary.json").read_text())
    assert summary["init"]["reached"] is True and summary["init"]["train_acc"] == 1.0
    assert summary["init"]["train_loss"] < 0.05
    rows = read_jsonl(tmp_path / "runs/fb/metrics.jsonl")
    assert rows[-1]["step"] == rows[-1]["epoch"] < 400  # one exact GD step per epoch, stopped early
    # final.pt is a valid init.checkpoint for lnsgd train.
    r2 = write_recipe({"name": "from-fb", "train": {"epochs": 1}, "init": {"checkpoint": str(tmp_path / "runs/fb/final.pt")},
                       "data": {"train_size": 100}}, name="r2.yaml")  # fmt: skip
    assert cli("train", r2, "--quiet").exit_code == 0


def test_init_unconverged_fails_unless_allowed(cli, write_recipe, tmp_path):
    path = write_recipe({"name": "fb", "optim": {"lr": 0.01}, "train": {"epochs": 2}})
    res = cli("init-fullbatch", path, "--quiet")
    assert res.exit_code == 4
    assert "stop condition not reached" in one_line_error(res)
    summary = json.loads((tmp_path / "runs/fb/summary.json").read_text())
    assert summary["init"]["reached"] is False and "warning" in summary["init"]
    res = cli("init-fullbatch", path, "init.allow_unconverged=true", "--force", "--quiet")
    assert res.exit_code == 0 and "warning" in res.output


def test_init_adversarial_end_to_end_and_resume(cli, write_recipe, tmp_path):
    extra = {"name": "adv", "noise": {"kind": "none", "p": 0.0}, "model": {"width": 64},
             "optim": {"lr": 0.01, "batch_size": 20},
             "train": {"epochs": 30, "eval_every": 1},
             "data": {"train_size": 60, "test_size": 100},
             "init": {"stop_loss": 0.05, "adversarial": {"replicas": 2, "memorize_epochs": 40, "memorize_acc": 0.9,
                                                         "memorize_lr": 0.01, "optimizer": "adam"}}}  # fmt: skip
    path = write_recipe(extra)
    res = cli("init-adversarial", path, "--quiet")
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "runs/adv/metrics.jsonl")
    phases = [r["phase"] for r in rows]
    assert phases[0] == "memorize" and phases[-1] == "fit" and phases == sorted(phases, key=["memorize", "fit"].index)
    memorized = [r for r in rows if r["phase"] == "memorize"][-1]
    assert memorized["train/acc"] >= 0.9  # accuracy on the 2×60 relabelled replicas
    summary = json.loads((tmp_path / "runs/adv/summary.json").read_text())
    assert summary["init"]["reached"] and summary["init"]["train_acc"] == 1.0

    # Interrupted in the fit phase and resumed: the same end as uninterrupted.

    from lnsgd.errors import RunInterrupted
    from lnsgd.inits import run_init

    recipe = load_recipe(path)
    with pytest.raises(RunInterrupted):
        run_init("adversarial", recipe, tmp_path / "adv2", progress=interrupt_at_epoch(2, phase="fit"))
    run_init("adversarial", recipe, tmp_path / "adv2", resume=True)
    a = torch.load(tmp_path / "runs/adv/final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "adv2/final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "throughput/img_per_s")} for r in rows]  # noqa: E731
    assert strip(rows) == strip(read_jsonl(tmp_path / "adv2/metrics.jsonl"))


def test_adversarial_refuses_regression_data(write_recipe):
    data = {"name": "synthetic", "train_size": None, "test_size": None}
    recipe = load_recipe(write_recipe({"data": data, "loss": "mse", "noise": {"kind": "none", "p": 0.0},
                                       "model": {"name": "mlp"}}))  # fmt: skip
    with pytest.raises(LnsgdError, match="regression"):
        adversarial_phases(recipe, load(recipe))


@pytest.mark.parametrize("override, fragment", [("init.adversarial.replicas=0", "replicas"),
                                                ("init.adversarial.zero_fraction=1.0", "zero_fraction"),
                                                ("init.adversarial.zero_fraction=-0.1", "zero_fraction")])  # fmt: skip
def test_bad_adversarial_settings(cli, write_recipe, override, fragment):
    assert fragment in one_line_error(cli("init-adversarial", write_recipe(), override, "--quiet"))
