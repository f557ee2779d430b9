"""A researcher's first hour (issue 18): a sweep beside the recipe's own run, help that names the
right recipe, flags that are honoured, and output meant for people (logs, headers, figures, labels)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lnsgd.cli import app
from lnsgd.errors import LnsgdError
from lnsgd.recipe import load_recipe, recipe_to_dict

from .conftest import one_line_error

ROOT = Path(__file__).parent.parent


def flat_text(output: str) -> str:
    """Help and tables with rich's box characters and line wrapping taken out."""
    return " ".join(re.sub(r"[│┃║╭╮╰╯─━]", " ", output).split())


def help_of(command: str) -> str:
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return flat_text(res.output)


# --------------------------------------------------------------------------- sweeps


def test_a_sweep_does_not_land_in_the_recipes_own_run_folder(write_recipe, tmp_path):
    from lnsgd.sweep import check_existing, plan_sweep

    recipe = write_recipe()
    run_folder = tmp_path / "runs" / "tiny"  # what `lnsgd train recipe.yaml` made before
    run_folder.mkdir(parents=True)
    (run_folder / "recipe.yaml").write_text("name: tiny\n")
    plan = plan_sweep(recipe, ["optim.lr=0.05,0.1", "seed=0,1"])
    assert plan.name == "tiny-lr-seed" and plan.dir == tmp_path / "runs" / "tiny-lr-seed"
    assert check_existing(plan, force=False) == []  # no refusal, nothing of the run's to delete
    assert plan_sweep(recipe, ["optim.lr=0.05,0.1", "seed=0,1"], zip_=True).name == "tiny-lr-seed-zip"
    assert plan_sweep(recipe, ["seed=0,1"]).name == "tiny-seed"
    assert plan_sweep(recipe, ["seed=0,1"], name="mine").name == "mine"
    res = CliRunner().invoke(app, ["sweep", str(recipe), "--grid", "seed=0,1", "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "tiny-seed" in flat_text(res.output)


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command, recipe",
    [
        ("validate", "recipes/quickstart.yaml"),
        ("train", "recipes/quickstart.yaml"),
        ("init-fullbatch", "recipes/quickstart-fullbatch.yaml"),
        ("init-adversarial", "recipes/quickstart-adversarial.yaml"),
        ("theory", "recipes/theory-quadratic.yaml"),
        ("sweep", "recipes/quickstart.yaml"),
    ],
)
def test_help_shows_an_example_with_the_commands_own_recipe(command, recipe):
    text = help_of(command)
    match = re.search(rf"Example[^:]*: (lnsgd {command} (recipes/\S+))", text)
    assert match, text
    assert match.group(2) == recipe
    load_recipe(ROOT / recipe)  # the example's recipe exists and is valid
    if recipe != "recipes/quickstart.yaml":
        assert "recipes/quickstart.yaml" not in text, text
        assert f"e.g. {recipe}" in text  # the argument's own help names it too


def test_init_adversarial_help_says_what_bounds_the_memorize_phase():
    text = help_of("init-adversarial")
    assert "init.adversarial.memorize_epochs" in text and "train.epochs bounds only the fit phase" in text


def test_compare_help_keeps_its_brackets():
    assert "median [min, max] over seeds" in help_of("compare")


# --------------------------------------------------------------------------- bench


def test_bench_on_a_cpu_honours_explicit_flags(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU configuration is what this checks")
    out = tmp_path / "bench.json"
    res = cli("bench", "--model", "mlp", "--batch-size", "16", "--steps", "3", "--no-epoch", "--json", out)
    assert res.exit_code == 0, res.output
    config = json.loads(out.read_text())["config"]
    assert (config["batch_size"], config["steps"]) == (16, 3)
    assert "batch 16, 3 steps" in flat_text(res.output)


# --------------------------------------------------------------------------- progress in logs


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_a_log_is_plain_periodic_lines():
    from lnsgd.track import LineProgress

    out, clock = io.StringIO(), Clock()
    progress = LineProgress(out, every_s=30.0, clock=clock)
    progress.start(10, 0, "tiny")
    for epoch in range(11):
        clock.now = 10.0 * epoch
        progress.advance(epoch, {"loss": 0.5, "test": 0.25})
    progress.stop()
    lines = out.getvalue().splitlines()
    # the first epoch, then one line per 30 s, and the last
    assert [line.split(":")[1].split()[0] for line in lines] == ["0/10", "3/10", "6/10", "9/10", "10/10"]
    assert lines[1] == "tiny: 3/10 epochs, 0:00:30 elapsed, ~0:01:10 left  loss 0.5  test 0.25"
    assert not any(c in out.getvalue() for c in "\r\x1b…")


def test_progress_stops_on_the_state_it_ended_in():
    from lnsgd.track import LineProgress

    out, clock = io.StringIO(), Clock()
    progress = LineProgress(out, every_s=30.0, clock=clock)
    progress.start(100, 40, "fit", unit="steps")
    progress.advance(40, {})
    clock.now = 5.0
    progress.advance(42, {"loss": 1.0})  # stopped early: no line due yet
    progress.stop()
    # resumed at step 40: the rate is of this session's 2 steps in 5 s
    assert out.getvalue().splitlines() == [
        "fit: 40/100 steps, 0:00:00 elapsed",
        "fit: 42/100 steps, 0:00:05 elapsed, ~0:02:25 left  loss 1",
    ]


def test_train_writes_whole_progress_lines_when_stderr_is_not_a_terminal(cli, write_recipe):
    from lnsgd.cli.app import err_console, progress_for
    from lnsgd.track import LineProgress

    assert not err_console.is_terminal  # pytest captures stderr
    assert isinstance(progress_for(False), LineProgress)
    res = cli("train", write_recipe())
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("tiny: ")]
    assert lines[0].startswith("tiny: 0/3 epochs, ") and lines[-1].startswith("tiny: 3/3 epochs, "), res.output
    assert "…" not in res.output


# --------------------------------------------------------------------------- measure-sharpness


@pytest.fixture
def tiny_ckpt(write_recipe, tmp_path):
    from lnsgd.train import train

    train(load_recipe(write_recipe()), tmp_path / "tiny")
    return tmp_path / "tiny" / "final.pt"


def test_measure_sharpness_header_says_hvps_per_estimator_and_in_all(cli, tiny_ckpt, tmp_path):
    out = tmp_path / "m.json"
    # --trace-method split: the tiny ReLU MLP's auto trace is exact (no HVPs), so the trace
    # must probe for two estimators (trace and R) to spend HVPs.
    res = cli("measure-sharpness", tiny_ckpt, "--hvps", "20", "--examples", "50", "--trace-method", "split", "--json", out,
              "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    spent = result["hvps_spent"]
    assert spent > 20 and result["hvps_per_estimator"] == 20 and result["hvps"] == spent
    assert f"20 HVPs per estimator, {spent} in all" in flat_text(res.output)


def test_density_title_fits_the_figure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lnsgd.sharpness import plot_density

    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), savefig(self, *a, **k))[1])
    path = "/home/someone/projects/label-noise/runs/quickstart-adversarial/checkpoints/final.pt"
    plot_density(torch.tensor([0.0, 1.0, 5.0]), torch.tensor([0.5, 0.3, 0.2]), tmp_path / "d.png",
                 title=f"Hessian spectral density (expected loss)\n{path}")  # fmt: skip
    (fig,) = saved
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    box, width = ax.title.get_window_extent(renderer), fig.bbox.width
    assert 0 <= box.x0 and box.x1 <= width, (box, width)
    assert ax.get_title().replace("\n", "") == f"Hessian spectral density (expected loss){path}"


# --------------------------------------------------------------------------- compare's group labels


def test_group_labels_name_a_null_or_set_section_once(write_recipe):
    from lnsgd.recipe import with_overrides
    from lnsgd.report.runs import Run, group_runs

    base = load_recipe(write_recipe())
    recipes = {"plain": base, "tracked": with_overrides(base, ["track.sharpness.every=8", "noise.p=0.3"]),
               "tracked-often": with_overrides(base, ["track.sharpness.every=2", "noise.p=0.3"])}  # fmt: skip
    runs = [Run(Path(name), name, recipe_to_dict(r), [], True, None) for name, r in recipes.items()]
    labels = sorted(g.label for g in group_runs(runs))
    assert labels == ["noise.p=0.2, track.sharpness=null",
                      "noise.p=0.3, track.sharpness.every=2", "noise.p=0.3, track.sharpness.every=8"]  # fmt: skip
    labels = sorted(g.label for g in group_runs(runs[:2]))
    assert labels == ["noise.p=0.2, track.sharpness=null", "noise.p=0.3, track.sharpness=set"]


# --------------------------------------------------------------------------- override typos


@pytest.mark.parametrize(
    "override, suggestion",
    [("optim.lrr=0.5", "optim.lr"), ("lr=0.5", "optim.lr"), ("trian.epochs=3", "train.epochs"),
     ("track.sharpness.everyy=2", "track.sharpness.every")],  # fmt: skip
)
def test_an_override_typo_names_the_override_and_the_nearest_field(write_recipe, override, suggestion):
    recipe = write_recipe()
    with pytest.raises(LnsgdError) as e:
        load_recipe(recipe, [override])
    message = str(e.value)
    assert message.startswith(f"override {override!r}: ") and f"did you mean `{suggestion}`?" in message, message
    assert str(recipe) not in message  # the file is not where the typo is


def test_an_override_typo_on_the_command_line(cli, write_recipe):
    line = one_line_error(cli("train", write_recipe(), "optim.lrr=0.5"))
    assert "optim.lrr: unknown key" in line and "did you mean `optim.lr`?" in line and "recipe.yaml" not in line


# --------------------------------------------------------------------------- packaging


def test_the_license_is_an_spdx_string_and_the_build_needs_a_setuptools_that_reads_it():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"
    (setuptools,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77"  # 77.0: project.license as an SPDX expression (PEP 639)


def test_measure_sharpness_progress_in_a_log_is_plain_lines(tiny_ckpt, tmp_path):
    # stderr is a pipe (a log file, a Slurm job log): lines, not a redrawn bar.
    proc = subprocess.run([sys.executable, "-m", "lnsgd", "measure-sharpness", str(tiny_ckpt), "--hvps", "12", "--examples", "50",
                           "--trace-method", "split"], cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("measuring: ")]
    assert lines and lines[-1].split()[1].split("/")[0] == lines[-1].split()[1].split("/")[1], proc.stderr
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
