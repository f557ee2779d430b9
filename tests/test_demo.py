"""The quickstart demo end to end at smoke-test size (the full size is `make demo`)."""

from __future__ import annotations

import json

from .conftest import one_line_error


def test_demo_quick_writes_summary_figure_and_table(cli, tmp_path):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--fullbatch", "--seeds", "2", "--jobs", "1", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["seeds"] == [0, 1]
    for block in (s["baseline"], s["inits"]["adversarial"], s["inits"]["fullbatch"]):
        assert {"train_acc", "test_acc", "trace_hessian", "proj_trace_hessian", "test_acc_range", "per_seed"} <= block.keys()
        assert 0.0 <= block["test_acc"] <= 1.0 and sorted(block["per_seed"]) == ["0", "1"]
    for arm in ("adversarial/sgd", "adversarial/label_noise", "fullbatch/sgd", "fullbatch/label_noise"):
        run = s["runs"][arm]
        assert {"train_acc", "test_acc", "trace_hessian", "proj_trace_hessian", "trace_curve"} <= run.keys()
        assert [row[0] for row in run["trace_curve"]] == [0, 1, 2]  # [epoch, median, min, max]
        for p in run["per_seed"].values():
            assert {"converged", "steps", "distance", "grad_norm_after"} <= p["projection"].keys()
    assert s["runs"]["adversarial/sgd"]["steps"] == s["runs"]["adversarial/label_noise"]["steps"]  # same number of steps
    assert s["seconds"] > 0 and set(s["checks"]) >= {"label_noise_5_points_above_sgd", "label_noise_flatter_at_the_nearest_minimizer"}
    assert all(len(v) == 2 and v[1] == 2 for v in s["seed_checks"].values())
    assert (out / "demo.png").stat().st_size > 5000
    for stage in ("baseline", "init-adversarial", "adversarial-sgd", "adversarial-label_noise"):
        assert (out / stage / "seed=1" / "final.pt").exists()
    assert "label-noise SGD" in res.output and "summary.json" in res.output and "nearest minimizer" in res.output
    # Each seed's arms start from that seed's adversarial init: the same first row.
    first = lambda run: json.loads((out / run / "seed=1" / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    init = s["inits"]["adversarial"]["per_seed"]["1"]["test_acc"]
    assert first("adversarial-sgd")["test/acc"] == first("adversarial-label_noise")["test/acc"] == init
    # Both arms are measured on one loss, the label-noise arm's, and say so.
    assert {first("adversarial-sgd")["sharp/loss"], first("adversarial-label_noise")["sharp/loss"]} == {"flip p=0.2"}


def test_demo_refuses_an_existing_folder(cli, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in one_line_error(cli("demo", "--quick", "--out", out, "--quiet"))
    assert (out / "keep.txt").read_text() == "mine"


def test_demo_stages_match_the_shipped_quickstart_recipes():
    """The demo's adversarial init and arms are recipes/quickstart-adversarial.yaml and quickstart-escape.yaml."""
    from pathlib import Path

    from lnsgd.demo import arm_recipe, demo_recipes
    from lnsgd.recipe import load_recipe, recipe_to_dict

    recipes = Path(__file__).parent.parent / "recipes"
    stages = demo_recipes()

    def core(recipe) -> dict:
        d = recipe_to_dict(recipe)
        d["data"].pop("root")  # mnist1d is generated, not read from disk
        return {k: d[k] for k in ("data", "model", "loss", "noise", "optim", "seed")} | {"init": d["init"]["adversarial"]}

    shipped = load_recipe(recipes / "quickstart-adversarial.yaml")
    assert core(stages["init-adversarial"]) == core(shipped)
    assert stages["init-adversarial"].train.epochs == shipped.train.epochs
    escape = load_recipe(recipes / "quickstart-escape.yaml")
    arm = arm_recipe(stages, "adversarial", "label_noise", Path("x"))
    for section in ("model", "loss", "noise", "optim"):
        assert recipe_to_dict(arm)[section] == recipe_to_dict(escape)[section], section
    assert arm.data.name == escape.data.name and arm.data.train_size == escape.data.train_size
    assert arm.train.epochs == escape.train.epochs


def _point(train_acc, test_acc, trace, proj, converged=True, curve=None):
    p = {"train_acc": train_acc, "test_acc": test_acc, "trace_hessian": trace, "proj_trace_hessian": proj,
         "projection": {"converged": converged, "grad_norm_after": 1e-5 if converged else 3e-3, "tol": 1e-4, "max_steps": 1000},
         "seconds": 1.0}  # fmt: skip
    if curve is not None:
        p.update(trace_curve=[[0, curve[0]], [8, curve[1]]], test_acc_curve=[[0, 0.6], [8, test_acc]], steps=100)
    return p


def test_the_three_seed_summary_is_medians_with_ranges_and_checks_count_the_seeds():
    from lnsgd.demo import demo_checks, demo_table, projection_notes, seed_checks, summarize

    # Hand-made points: seed 1's plain SGD escapes (90%), so label noise is not 5 points above it there,
    # and seed 2's label-noise end point is sharper on Γ than plain SGD's.
    points = {
        "baseline/0": _point(0.96, 0.88, 128, 147), "baseline/1": _point(0.95, 0.84, 146, 144), "baseline/2": _point(0.95, 0.87, 128, 149),
        "init/adversarial/0": _point(1.0, 0.61, 96, 285, converged=False), "init/adversarial/1": _point(1.0, 0.60, 86, 129),
        "init/adversarial/2": _point(1.0, 0.58, 72, 152),
        "adversarial/sgd/0": _point(1.0, 0.62, 5, 115, curve=(96, 5)), "adversarial/sgd/1": _point(1.0, 0.90, 9, 122, curve=(86, 9)),
        "adversarial/sgd/2": _point(1.0, 0.59, 8, 90, curve=(72, 8)),
        "adversarial/label_noise/0": _point(0.98, 0.876, 95, 79, curve=(96, 150)),
        "adversarial/label_noise/1": _point(0.99, 0.888, 106, 81, curve=(86, 120)),
        "adversarial/label_noise/2": _point(0.99, 0.80, 100, 95, curve=(72, 130)),
    }  # fmt: skip
    s = summarize(points, [0, 1, 2], ["adversarial"])
    ln, sgd = s["runs"]["adversarial/label_noise"], s["runs"]["adversarial/sgd"]
    assert (s["baseline"]["test_acc"], s["baseline"]["test_acc_range"]) == (0.87, [0.84, 0.88])
    assert (sgd["test_acc"], sgd["test_acc_range"], sgd["proj_trace_hessian"]) == (0.62, [0.59, 0.90], 115)
    assert (ln["test_acc"], ln["proj_trace_hessian"], ln["proj_trace_hessian_range"]) == (0.876, 81, [79, 95])
    assert s["inits"]["adversarial"]["projections_converged"] == 2 and s["inits"]["adversarial"]["seeds"] == 3
    assert ln["trace_curve"] == [[0, 86, 72, 96], [8, 130, 120, 150]]  # [epoch, median, min, max]
    checks = demo_checks(s)
    # Medians: gap 0.87 − 0.60 = 0.27; LN 0.876 − SGD 0.62 ≥ 0.05; recovered 0.276 ≥ 0.135; 81 < 115.
    assert all(checks.values()), checks
    per_seed = seed_checks(s)
    assert per_seed["label_noise_5_points_above_sgd"] == [2, 3]  # seed 1: 0.888 − 0.90 < 0.05
    assert per_seed["label_noise_flatter_at_the_nearest_minimizer"] == [2, 3]  # seed 2: 95 > 90
    assert per_seed["adversarial_init_15_points_below_baseline"] == [3, 3]
    assert per_seed["label_noise_recovers_half_the_gap"] == [3, 3]  # seed 2: 0.80 − 0.58 = 0.22 ≥ 0.145
    (note,) = projection_notes(s)
    assert note.startswith("adversarial init: 1 of 3 projections did not reach")
    s["seconds"] = 1.0
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(demo_table(s))
    text = console.export_text()
    assert "87.0% [84.0, 88.0]" in text and "81 [79, 95]" in text and "152 [129, 285] *" in text  # medians [min, max]; * unconverged


def test_demo_in_worker_processes_matches_one_process(cli, tmp_path):
    # --jobs 2 spawns worker processes; every stage is seeded, so the numbers are those of --jobs 1.
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli("demo", "--quick", "--seeds", "1", "--jobs", "1", "--out", one, "--quiet").exit_code == 0
    res = cli("demo", "--quick", "--seeds", "1", "--jobs", "2", "--out", two, "--quiet")
    assert res.exit_code == 0, res.output
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for block in ("baseline", "inits", "runs"):
        assert _numbers(a[block]) == _numbers(b[block]), block
    assert "(1/1 seeds)" in res.output or "(0/1 seeds)" in res.output


def _numbers(block):
    """Every value but timings."""
    if isinstance(block, dict):
        return {k: _numbers(v) for k, v in block.items() if k != "seconds"}
    if isinstance(block, list):
        return [_numbers(v) for v in block]
    return block


def test_demo_bad_seeds_or_jobs_are_one_line_and_write_nothing(cli, tmp_path):
    for args, fragment in ((["--seeds", "0"], "--seeds"), (["--jobs", "0"], "--jobs")):
        out = tmp_path / f"demo{fragment}"
        assert fragment in one_line_error(cli("demo", "--quick", *args, "--out", out, "--quiet"))
        assert not out.exists()


def test_ctrl_c_during_a_parallel_demo_is_one_line_exit_130_and_leaves_no_worker(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lnsgd", "demo", "--quick", "--seeds", "8", "--jobs", "2", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*/seed=*/metrics.jsonl")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("error: demo stopped by Ctrl-C after "), stderr
    assert "--force" in stderr and "--resume" not in stderr and "Traceback" not in stderr
    alive = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not alive, f"worker processes left behind: {alive}"
