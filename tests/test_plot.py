"""lnsgd.report against synthetic run folders written into tmp_path."""

import csv
import json
import statistics

import pytest
import yaml

from lnsgd.errors import LnsgdError
from lnsgd.report import (
    Run,
    compare_runs,
    compare_table,
    find_runs,
    flatten,
    group_runs,
    load_run,
    plot_runs,
    read_metrics,
    write_csv,
)


def make_recipe(name="run", seed=0, lr=0.5, kind="flip", checkpoint=None):
    return {
        "name": name,
        "seed": seed,
        "device": "cpu",
        "precision": "fp32",
        "data": {"name": "cifar10", "root": "data", "download": False, "train_size": None},
        "model": {"name": "resnet18", "norm": "group", "group_size": 32, "width": 64},
        "init": {"checkpoint": checkpoint},
        "loss": "cross_entropy",
        "noise": {"kind": kind, "p": 0.2, "sigma": None},
        "optim": {"lr": lr, "momentum": 0.0, "batch_size": 256, "schedule": {"kind": "constant"}},
        "train": {"epochs": 3, "eval_every": 1},
        "log": {"dir": f"runs/{name}", "wandb": {"enabled": False, "project": name}},
    }


def write_run(folder, recipe, rows, finished=True, tail=""):
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (folder / "metrics.jsonl").write_text(text)
    if finished:
        (folder / "summary.json").write_text(json.dumps({"wall_time_s": 10.0 + recipe["seed"]}))
    return folder


def rows_for(seed, epochs=3, sharp=True):
    rows = []
    for e in range(epochs):
        row = {
            "epoch": e,
            "step": 10 * e,
            "time_s": 1.5 * e + 0.1 * seed,
            "train/acc": 0.9 + 0.01 * e,
            "test/acc": 0.5 + 0.1 * e + 0.01 * seed,
            "train/loss": 1.0 / (e + 1),
        }
        if sharp:
            row["sharp/R"] = 100.0 - 10 * e + seed
        rows.append(row)
    return rows


@pytest.fixture
def sweep(tmp_path):
    """2 learning rates × 3 seeds, nested like a sweep folder with extras."""
    root = tmp_path / "sweep"
    for lr in (1.0, 0.5):
        for seed in range(3):
            name = f"lr{lr}-s{seed}"
            write_run(root / f"lr={lr}" / f"seed={seed}", make_recipe(name, seed, lr), rows_for(seed))
    (root / "sweep.json").write_text("{}")
    (root / "submitit").mkdir()
    return root


# ---------------------------------------------------------------- reading runs


def test_flatten_dotted_keys():
    flat = flatten({"a": 1, "b": {"c": 2, "d": {"e": [1, 2]}}, "f": {}})
    assert flat == {"a": 1, "b.c": 2, "b.d.e": [1, 2], "f": {}}


def test_torn_last_line_is_tolerated(tmp_path):
    run = write_run(tmp_path / "r", make_recipe(), rows_for(0), finished=False,
                    tail='{"epoch": 3, "test/ac')
    assert len(read_metrics(run / "metrics.jsonl")) == 3
    loaded = load_run(run)
    assert not loaded.finished and loaded.summary is None and len(loaded.rows) == 3


def test_torn_middle_line_is_an_error_naming_file_and_line(tmp_path):
    run = write_run(tmp_path / "r", make_recipe(), [])
    lines = [json.dumps(r) for r in rows_for(0)]
    lines.insert(1, '{"epoch": 1, "te')
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LnsgdError, match=r"metrics\.jsonl, line 2"):
        read_metrics(run / "metrics.jsonl")


def test_find_runs_walks_sweeps_and_disambiguates_names(sweep):
    runs = find_runs([sweep])
    assert len(runs) == 6
    assert len({r.name for r in runs}) == 6
    assert {r.name for r in runs} >= {"lr=0.5/seed=0", "lr=1.0/seed=2"}
    assert all(r.finished for r in runs)
    # The same run given twice is read once.
    assert len(find_runs([sweep, sweep / "lr=0.5" / "seed=0"])) == 6


def test_non_run_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(LnsgdError, match="is not a run folder .* and contains none"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(LnsgdError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    with pytest.raises(LnsgdError, match="no run folders given"):
        find_runs([])


# -------------------------------------------------------------------- grouping


def test_two_lrs_by_three_seeds_make_two_groups(sweep):
    groups = group_runs(find_runs([sweep]))
    assert [g.label for g in groups] == ["optim.lr=0.5", "optim.lr=1.0"]
    assert [g.differing for g in groups] == [{"optim.lr": 0.5}, {"optim.lr": 1.0}]
    assert [len(g.runs) for g in groups] == [3, 3]
    assert {r.recipe["optim"]["lr"] for r in groups[0].runs} == {0.5}


def fake_run(recipe, rows=()):
    return Run(path=None, name=recipe["name"], recipe=recipe, rows=list(rows),
               finished=True, summary=None)


def test_seed_and_per_run_fields_only_make_one_group_named_after_the_runs():
    runs = [fake_run(make_recipe(f"gn-flip-s{s}", seed=s)) for s in range(3)]
    runs[1].recipe["device"] = "cuda:1"
    runs[2].recipe["log"]["wandb"]["run_id"] = "abc"
    (group,) = group_runs(runs)
    assert group.label == "gn-flip"
    assert group.differing == {} and len(group.runs) == 3


def test_several_differing_keys_and_init_checkpoints_are_named_readably():
    runs = []
    for ckpt in ("runs/adversarial/final.pt", "/abs/runs/fullbatch/final.pt", None):
        for kind in ("flip", "none"):
            runs.append(fake_run(make_recipe("r", kind=kind, checkpoint=ckpt)))
    labels = [g.label for g in group_runs(runs)]
    assert len(labels) == 6
    assert "init=adversarial, noise.kind=flip" in labels
    assert "init=fullbatch, noise.kind=none" in labels
    assert "init=random, noise.kind=flip" in labels


def test_ignore_merges_groups():
    runs = [fake_run(make_recipe("r", seed=s, checkpoint=f"runs/adv-s{s}/final.pt"))
            for s in range(3)]
    assert len(group_runs(runs)) == 3
    assert len(group_runs(runs, ignore=["init.checkpoint"])) == 1


# --------------------------------------------------------------------- figures


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_default_figure_files_panels_and_exact_csv(sweep, tmp_path):
    base = write_run(tmp_path / "base", make_recipe("base"), [{"epoch": 0, "test/acc": 0.48}])
    result = plot_runs([sweep], tmp_path / "out", baseline=base)
    assert [p.name for p in result.files] == ["plot.png", "plot.pdf", "plot.csv"]
    assert all(p.stat().st_size > 0 for p in result.files)
    assert result.panels == ["train/acc", "test/acc", "sharp/R", "correlation"]
    titles = [ax.get_title() for ax in result.figure.axes if ax.get_visible()]
    assert titles == ["Train accuracy (clean labels)", "Test accuracy",
                      "Implicit regularizer R(θ)", "Test accuracy vs. sharpness"]
    assert result.figure.axes[0].get_xlabel() == "epoch"
    assert result.notes == []

    rows = read_csv(result.files[-1])
    # Hand-computed: test/acc at epoch 2 over seeds 0, 1, 2 = 0.7, 0.71, 0.72.
    (row,) = [r for r in rows if r["panel"] == "test/acc" and r["label"] == "optim.lr=0.5"
              and r["x"] == "2.0"]
    expected = [0.5 + 0.1 * 2 + 0.01 * s for s in range(3)]
    assert float(row["median"]) == statistics.median(expected)
    assert float(row["min"]) == min(expected) and float(row["max"]) == max(expected)
    assert row["n_runs"] == "3"
    # sharp/R at epoch 1: 90, 91, 92.
    (row,) = [r for r in rows if r["panel"] == "sharp/R" and r["label"] == "optim.lr=1.0"
              and r["x"] == "1.0"]
    assert (float(row["median"]), float(row["min"]), float(row["max"])) == (91.0, 90.0, 92.0)
    # Every (panel, group) has one row per epoch; correlation pairs medians.
    assert len([r for r in rows if r["panel"] == "train/acc"]) == 2 * 3
    corr = [r for r in rows if r["panel"] == "correlation" and r["label"] == "optim.lr=0.5"]
    assert [float(r["x"]) for r in corr] == [101.0, 91.0, 81.0]
    assert [float(r["median"]) for r in corr] == [
        statistics.median([0.5 + 0.1 * e + 0.01 * s for s in range(3)]) for e in range(3)]

    # --baseline: a dashed line at its final test accuracy, on test/acc and correlation.
    test_ax = result.figure.axes[1]
    assert any(line.get_linestyle() == "--" and list(line.get_ydata()) == [0.48, 0.48]
               for line in test_ax.get_lines())
    base_rows = [r for r in rows if r["group"] == "baseline"]
    assert [(r["panel"], float(r["median"])) for r in base_rows] == [("test/acc", 0.48),
                                                                     ("correlation", 0.48)]


# formats=() writes only the CSV: these tests check data, not rendering.


def test_uneven_seeds_use_the_union_of_x_and_smoothing(tmp_path):
    # Seed 0 logged epochs 0..3, seed 1 only 0..1 (still running).
    write_run(tmp_path / "a", make_recipe("a", 0), rows_for(0, epochs=4))
    write_run(tmp_path / "b", make_recipe("b", 1), rows_for(1, epochs=2), finished=False)
    result = plot_runs([tmp_path], tmp_path / "out", x="step", smooth=2, formats=())
    rows = read_csv(result.files[-1])
    acc = [r for r in rows if r["panel"] == "test/acc"]
    assert [(r["x"], r["n_runs"]) for r in acc] == [("0.0", "2"), ("10.0", "2"),
                                                    ("20.0", "1"), ("30.0", "1")]
    assert float(acc[2]["median"]) == float(acc[2]["min"]) == 0.5 + 0.2
    corr = [float(r["x"]) for r in rows if r["panel"] == "correlation"]
    sharp = [100.5, 90.5, 80.0, 70.0]  # medians of 100 - 10e + seed
    assert corr == [sharp[0], (sharp[0] + sharp[1]) / 2, (sharp[1] + sharp[2]) / 2,
                    (sharp[2] + sharp[3]) / 2]
    assert any("b is still in progress" in n for n in result.notes)


def test_missing_metric_skips_panel_with_note(tmp_path):
    write_run(tmp_path / "a", make_recipe("a"), rows_for(0, sharp=False))
    result = plot_runs([tmp_path / "a"], tmp_path / "out", formats=())
    assert result.panels == ["train/acc", "test/acc"]
    assert len([ax for ax in result.figure.axes if ax.get_visible()]) == 2
    assert any("sharp/R panel skipped" in n and "sharp/trace_hessian" in n for n in result.notes)
    assert any("correlation panel skipped" in n for n in result.notes)


def test_trace_hessian_is_the_fallback_sharpness(tmp_path):
    rows = rows_for(0, sharp=False)
    for r in rows:
        r["sharp/trace_hessian"] = 5.0
    write_run(tmp_path / "a", make_recipe("a"), rows)
    result = plot_runs([tmp_path / "a"], tmp_path / "out", formats=())
    assert result.panels == ["train/acc", "test/acc", "sharp/trace_hessian", "correlation"]


def test_metrics_option_replaces_panels_and_validates(sweep, tmp_path):
    result = plot_runs([sweep], tmp_path / "out", metrics=["train/loss", "lr"], formats=())
    assert result.panels == ["train/loss"]
    assert any("lr panel skipped" in n for n in result.notes)
    with pytest.raises(LnsgdError, match="unknown metric 'bogus'"):
        plot_runs([sweep], tmp_path / "out", metrics=["bogus"])
    with pytest.raises(LnsgdError, match="--x"):
        plot_runs([sweep], tmp_path / "out", x="wall")
    with pytest.raises(LnsgdError, match="--smooth"):
        plot_runs([sweep], tmp_path / "out", smooth=0)


def test_baseline_without_test_acc_is_an_error(sweep, tmp_path):
    nobase = write_run(tmp_path / "nobase", make_recipe("nobase"), [{"epoch": 0}])
    with pytest.raises(LnsgdError, match="baseline .* has no test/acc"):
        plot_runs([sweep], tmp_path / "out", baseline=nobase)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LnsgdError, match="not a run folder|no run"):
        plot_runs([sweep], tmp_path / "out", baseline=tmp_path / "empty")


# ------------------------------------------------------------------ comparison


def test_compare_median_min_max_exact(sweep, tmp_path):
    # Make lr=0.5 seed 2 still running: no summary.json.
    (sweep / "lr=0.5" / "seed=2" / "summary.json").unlink()
    columns, rows = compare_runs([sweep])
    col = {c: i for i, c in enumerate(columns)}
    by = {(r[col["label"]], r[col["metric"]]): r for r in rows}
    r = by["optim.lr=0.5", "test/acc"]  # last rows: 0.7, 0.71, 0.72
    assert (r[col["median"]], r[col["min"]], r[col["max"]]) == (0.71, 0.7, 0.72)
    assert (r[col["n_runs"]], r[col["n_finished"]]) == (3, 2)
    r = by["optim.lr=1.0", "summary.wall_time_s"]  # 10, 11, 12
    assert (r[col["median"]], r[col["min"]], r[col["max"]], r[col["n_runs"]]) == (11.0, 10.0, 12.0, 3)
    assert ("optim.lr=0.5", "summary.wall_time_s") in by

    out = write_csv(tmp_path / "cmp.csv", columns, rows)
    back = read_csv(out)
    assert len(back) == len(rows) and float(back[0]["median"]) == rows[0][col["median"]]

    from rich.console import Console
    console = Console(width=200, record=True)
    console.print(compare_table(columns, rows))
    text = console.export_text()
    assert "optim.lr=0.5" in text and "1 running" in text and "71.00% [70.00%, 72.00%]" in text


def test_compare_last_value_per_metric_even_when_last_row_lacks_it(tmp_path):
    rows = [{"epoch": 0, "sharp/R": 3.0, "test/acc": 0.1}, {"epoch": 1, "test/acc": 0.2},
            {"epoch": 2, "test/acc": None}]
    write_run(tmp_path / "a", make_recipe("a"), rows)
    columns, out = compare_runs(tmp_path / "a")
    values = {r[2]: r[3] for r in out}
    assert values["sharp/R"] == 3.0 and values["test/acc"] == 0.2 and values["epoch"] == 2


def test_no_runs_is_an_error():
    with pytest.raises(LnsgdError, match="no run"):
        compare_runs([])


def test_correlation_alone_still_names_groups_in_the_legend(sweep, tmp_path):
    result = plot_runs([sweep], tmp_path / "out", metrics=["correlation"], formats=())
    assert result.panels == ["correlation"]
    (legend,) = result.figure.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:2] == ["optim.lr=0.5 (n=3)", "optim.lr=1.0 (n=3)"]


def test_expected_loss_gap_is_a_default_panel_with_a_log_axis_when_logged(tmp_path):
    gaps = [0.5, 0.05, 0.004]
    rows = rows_for(0)
    for row, gap in zip(rows, gaps):
        row["train/expected_loss_gap"] = gap
    write_run(tmp_path / "a", make_recipe("a"), rows)
    result = plot_runs([tmp_path / "a"], tmp_path / "out", formats=())
    assert result.panels == ["train/acc", "test/acc", "train/expected_loss_gap", "sharp/R", "correlation"]
    (ax,) = [a for a in result.figure.axes if a.get_title() == "Expected train loss above its minimum"]
    assert ax.get_yscale() == "log"  # the gap falls towards 0: orders of magnitude matter
    drawn = [float(r["median"]) for r in read_csv(result.files[-1]) if r["panel"] == "train/expected_loss_gap"]
    assert drawn == gaps
    # A gap that touches 0 cannot go on a log axis: linear, and still drawn.
    write_run(tmp_path / "b", make_recipe("b"), [dict(r, **{"train/expected_loss_gap": g}) for r, g in zip(rows, [0.5, 0.0, 0.0])])
    result = plot_runs([tmp_path / "b"], tmp_path / "out_b", metrics=["train/expected_loss_gap"], formats=())
    assert result.panels == ["train/expected_loss_gap"] and result.figure.axes[0].get_yscale() == "linear"
    # Runs without it (older runs) keep the four default panels (test_default_figure_files_panels_and_exact_csv).


def test_sharpness_of_different_losses_is_refused_and_one_loss_is_named_on_the_axis(tmp_path):
    # A plain-SGD control measured on its own expected loss (the clean one) against a
    # label-noise run measured on the smoothed loss: two different functions on one axis.
    def rows(loss):
        return [{**r, "sharp/loss": loss, "sharp/trace_hessian": r["sharp/R"]} for r in rows_for(0)]

    noisy = write_run(tmp_path / "noisy", make_recipe("noisy"), rows("flip p=0.2"))
    plain = write_run(tmp_path / "plain", make_recipe("plain", kind="none"), rows("clean"))
    with pytest.raises(LnsgdError, match=r"different losses \(flip p=0.2: noisy; clean: plain\).*track.sharpness.loss=flip"):
        plot_runs([noisy, plain], tmp_path / "out")
    # Rows of older lnsgd said "expected": resolved from each run's own noise, so still refused.
    old = write_run(tmp_path / "old-plain", make_recipe("old-plain", kind="none"), rows("expected"))
    with pytest.raises(LnsgdError, match="different losses"):
        plot_runs([noisy, old], tmp_path / "out")
    pinned = write_run(tmp_path / "pinned", make_recipe("pinned", kind="none"), rows("flip p=0.2"))
    result = plot_runs([noisy, pinned], tmp_path / "out")
    labels = [ax.get_ylabel() for ax in result.figure.axes if "∇²L" in ax.get_ylabel() or "R(θ)" in ax.get_ylabel()]
    assert labels and all(label.endswith(", flip p=0.2 loss") for label in labels), labels


def test_a_projected_trace_gets_its_panel_and_the_correlation_reads_it(tmp_path):
    # track.sharpness.project logs sharp/proj_trace_hessian next to sharp/trace_hessian: both panels,
    # and the correlation panel pairs test accuracy with the reading at the nearest minimizer.
    rows = rows_for(0, sharp=False)
    for r in rows:
        r["sharp/trace_hessian"], r["sharp/proj_trace_hessian"] = 5.0 + r["epoch"], 50.0 - r["epoch"]
    write_run(tmp_path / "a", make_recipe("a"), rows)
    result = plot_runs([tmp_path / "a"], tmp_path / "out")
    assert result.panels == ["train/acc", "test/acc", "sharp/trace_hessian", "sharp/proj_trace_hessian", "correlation"]
    titles = [ax.get_title() for ax in result.figure.axes if ax.get_visible()]
    assert "Sharpness at the nearest minimizer: Hessian trace" in titles
    corr = [r for r in read_csv(result.files[-1]) if r["panel"] == "correlation"]
    assert [float(r["x"]) for r in corr] == [50.0, 49.0, 48.0]


def test_a_baseline_folder_of_seeds_draws_their_median(sweep, tmp_path):
    # The demo's runs/demo/baseline holds one run per seed: the line is at their median final test accuracy.
    for seed, acc in ((0, 0.84), (1, 0.88), (2, 0.87)):
        write_run(tmp_path / "base" / f"seed={seed}", make_recipe("base", seed=seed), [{"epoch": 0, "test/acc": acc}])
    result = plot_runs([sweep], tmp_path / "out", baseline=tmp_path / "base", formats=())
    (row,) = [r for r in read_csv(result.files[-1]) if r["group"] == "baseline" and r["panel"] == "test/acc"]
    assert float(row["median"]) == 0.87 and row["n_runs"] == "3" and "median of 3" in row["label"]
