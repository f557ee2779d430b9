"""The quickstart demo end to end at smoke-test size (the full size is `make demo`)."""

from __future__ import annotations

import json

from .conftest import one_line_error


def test_demo_quick_writes_summary_figure_and_table(cli, tmp_path):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--fullbatch", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    for block in (s["baseline"], s["inits"]["adversarial"], s["inits"]["fullbatch"]):
        assert {"train_acc", "test_acc", "trace_hessian"} <= block.keys()
        assert 0.0 <= block["test_acc"] <= 1.0
    for arm in ("adversarial/sgd", "adversarial/label_noise", "fullbatch/sgd", "fullbatch/label_noise"):
        run = s["runs"][arm]
        assert {"train_acc", "test_acc", "trace_hessian", "trace_curve"} <= run.keys()
        assert [e for e, _ in run["trace_curve"]] == [0, 1, 2]
    assert s["runs"]["adversarial/sgd"]["steps"] == s["runs"]["adversarial/label_noise"]["steps"]  # same number of steps
    assert s["seconds"] > 0 and set(s["checks"]) >= {"label_noise_5_points_above_sgd", "trace_ends_below_peak"}
    assert (out / "demo.png").stat().st_size > 5000
    for stage in ("baseline", "init-adversarial", "adversarial-sgd", "adversarial-label_noise"):
        assert (out / stage / "final.pt").exists()
    assert "label-noise SGD" in res.output and "summary.json" in res.output
    # The arms start from the adversarial init's weights: the same first row.
    first = lambda run: json.loads((out / run / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert first("adversarial-sgd")["test/acc"] == first("adversarial-label_noise")["test/acc"] == s["inits"]["adversarial"]["test_acc"]


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
