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
