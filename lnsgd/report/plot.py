"""Figures in the layout of Damian, Ma & Lee (2021), Figure 3, from grouped runs.

Train accuracy, test accuracy, the expected loss's gap to its minimum (when logged)
and sharpness against x, and test accuracy against sharpness, written as PNG and
PDF together with a CSV of exactly the values drawn. matplotlib is imported only
when a figure is drawn.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lnsgd.errors import LnsgdError
from lnsgd.report.compare import write_csv
from lnsgd.report.runs import (
    KNOWN_METRICS,
    METRICS_FILE,
    SUMMARY_FILE,
    Curve,
    Group,
    Run,
    aggregate,
    as_runs,
    finite_float,
    group_runs,
    load_run,
    measured_losses,
    run_series,
    running_mean,
)

X_METRICS = ("epoch", "step", "time_s")

# The name that asks for the test-accuracy-against-sharpness panel in `metrics`.
CORRELATION = "correlation"

# The expected loss minus its minimum over predictions: the distance to the manifold of
# expected-loss minimizers that the theory's flattening moves along. A default panel
# whenever a run logged it.
GAP = "train/expected_loss_gap"

# (panel title, y-axis label) per metric. Accuracies are fractions in [0, 1] and
# are drawn as fractions with a percent axis, so the CSV holds what is plotted.
METRIC_LABELS = {
    "epoch": ("Epoch", "epoch"),
    "step": ("Step", "step (SGD updates)"),
    "time_s": ("Wall time", "wall time (s)"),
    "lr": ("Learning rate", "learning rate η"),
    "lambda_eff": ("Regularization strength", "λ = ησ²/B"),
    "train/loss": ("Train loss (clean labels)", "loss"),
    "train/acc": ("Train accuracy (clean labels)", "accuracy (%)"),
    "train/expected_loss": ("Train loss, expected over label noise", "loss"),
    "train/expected_loss_gap": ("Expected train loss above its minimum", "L(θ) − min L"),
    "test/loss": ("Test loss", "loss"),
    "test/acc": ("Test accuracy", "accuracy (%)"),
    "train/noisy_loss": ("Train loss on noisy labels", "loss"),
    "grad/norm": ("Gradient norm", "‖∇L(θ)‖₂"),
    "weight/norm": ("Weight norm", "‖θ‖₂"),
    "sharp/trace_hessian": ("Sharpness: Hessian trace", "tr ∇²L(θ)"),
    "sharp/lambda_max": ("Sharpness: top Hessian eigenvalue", "λ_max(∇²L(θ))"),
    "sharp/trace_gn": ("Sharpness: Gauss–Newton trace", "tr G(θ)"),
    "sharp/R": ("Implicit regularizer R(θ)", "R(θ)"),
    "sharp/proj_trace_hessian": ("Sharpness at the nearest minimizer: Hessian trace", "tr ∇²L(Φ(θ))"),
    "sharp/proj_lambda_max": ("Sharpness at the nearest minimizer: top eigenvalue", "λ_max(∇²L(Φ(θ)))"),
    "sharp/proj_trace_gn": ("Sharpness at the nearest minimizer: Gauss–Newton trace", "tr G(Φ(θ))"),
    "sharp/proj_R": ("Implicit regularizer at the nearest minimizer", "R(Φ(θ))"),
    "sharp/proj_distance": ("Distance to the nearest minimizer", "‖Φ(θ) − θ‖₂"),
    "throughput/img_per_s": ("Throughput", "images / s"),
}


@dataclass
class PlotResult:
    """What `plot_runs` wrote and what the user should be told."""

    files: list[Path]  # the figures (PNG, PDF by default), then the CSV last
    notes: list[str]  # panels skipped, runs in progress, ...; for the CLI to print
    panels: list[str] = field(default_factory=list)  # metric per axis, or "correlation"
    figure: Any = None  # the matplotlib Figure (not registered with pyplot)


# ------------------------------------------------------------------------ figures


def _has_metric(runs: Iterable[Run], metric: str) -> bool:
    return any(finite_float(row.get(metric)) is not None for r in runs for row in r.rows)


def _panel_list(
    runs: list[Run], metrics: Sequence[str] | None
) -> tuple[list[str], str | None, list[str]]:
    """The y panels to draw, the sharpness metric for the correlation panel, and
    notes about requested panels that no run has."""
    notes = []
    present = {k for r in runs for row in r.rows for k in row}
    sharp_default = next((m for m in ("sharp/R", "sharp/trace_hessian") if _has_metric(runs, m)), None)
    # Measured at the nearest minimizer too (track.sharpness.project): that panel as well, and the
    # correlation panel on it, the theory's reading.
    projected = next((m for m in ("sharp/proj_R", "sharp/proj_trace_hessian") if _has_metric(runs, m)), None)
    if metrics is None:
        wanted = ["train/acc", "test/acc", *([GAP] if _has_metric(runs, GAP) else []), sharp_default or "sharp/R",
                  *([projected] if projected else []), CORRELATION]  # fmt: skip
        sharp = projected or sharp_default
    else:
        wanted = list(dict.fromkeys(metrics))
        if not wanted:
            raise LnsgdError("--metrics is empty; name at least one metric")
        for m in wanted:
            if m not in KNOWN_METRICS and m not in present and m != CORRELATION:
                valid = ", ".join((*KNOWN_METRICS, CORRELATION))
                raise LnsgdError(f"--metrics: unknown metric {m!r}; valid: {valid}")
        listed_sharp = [m for m in wanted if m.startswith("sharp/") and _has_metric(runs, m)]
        sharp = listed_sharp[0] if listed_sharp else sharp_default

    panels = []
    for m in wanted:
        if m == CORRELATION:
            if sharp is None or not _has_metric(runs, "test/acc"):
                lacking = "test/acc" if sharp is not None else "sharp/R or sharp/trace_hessian"
                notes.append(f"correlation panel skipped: no run has {lacking}")
                continue
        elif not _has_metric(runs, m):
            lacking = "sharp/R or sharp/trace_hessian" if metrics is None and m == "sharp/R" else m
            notes.append(f"{m} panel skipped: no run has values of {lacking}")
            continue
        panels.append(m)
    return panels, sharp, notes


def _log_scale(metric: str, values: Sequence[float]) -> bool:
    """Losses and curvature may span orders of magnitude (DESIGN.md: plain SGD's
    trace fell 170× by confidence alone); use a log axis when they do. The loss gap
    falls towards 0, so it gets a log axis whenever every value is positive."""
    positive = [v for v in values if v > 0]
    if metric == GAP:
        return len(positive) == len(values) and bool(values)
    if not (metric.startswith("sharp/") or metric.endswith("loss") or metric == "grad/norm"):
        return False
    return len(positive) == len(values) and bool(values) and max(values) / min(values) >= 100


CSV_COLUMNS = ("panel", "group", "label", "x_metric", "x", "y_metric", "median", "min", "max", "n_runs")


def plot_runs(
    paths_or_runs: Any,
    out_dir: str | Path,
    x: str = "epoch",
    metrics: Sequence[str] | None = None,
    baseline: str | Path | Run | None = None,
    smooth: int = 1,
    ignore: Iterable[str] = (),
    stem: str = "plot",
    formats: Sequence[str] = ("png", "pdf"),
) -> PlotResult:
    """Draw runs grouped over seeds; write <stem>.png, <stem>.pdf and <stem>.csv.

    `formats` are the figure files' extensions (any that matplotlib writes); the
    CSV is always written. `ignore` lists extra recipe keys that should not split
    groups (see `group_runs`).

    Panels: each metric against `x` (median line, min–max band over seeds; the
    default list adds train/expected_loss_gap, on a log axis, when a run has it), and
    with the default metrics (or "correlation" in `metrics`) test accuracy
    against sharpness (sharp/R if any run has it, else sharp/trace_hessian) as in
    Damian et al. (2021), Fig. 3. The correlation panel pairs each group's median
    sharpness and median test accuracy at the x values where both exist, then
    smooths both with a trailing running mean of `smooth` points.

    The CSV has one row per drawn point (columns `CSV_COLUMNS`): for metric
    panels x is the x value and median/min/max the statistics over the n_runs
    seeds with a value there; for the correlation panel x is the smoothed median
    sharpness, median the smoothed median test accuracy, min/max are empty and
    n_runs is the fewest runs behind any point of the window; the baseline is a
    row with group "baseline" and an empty x.
    """
    if x not in X_METRICS:
        raise LnsgdError(f"--x: {x!r} is not an x axis; valid: {', '.join(X_METRICS)}")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise LnsgdError(f"--smooth: {smooth!r} is not a window; pass an integer ≥ 1")
    runs = as_runs(paths_or_runs)
    if not runs:
        raise LnsgdError("no runs found")
    groups = group_runs(runs, ignore=ignore)
    base = _load_baseline(baseline)

    notes = _progress_notes(runs)
    panels, sharp, panel_notes = _panel_list(runs, metrics)
    notes += panel_notes
    if not panels:
        raise LnsgdError("nothing to plot: " + "; ".join(panel_notes))
    loss = _one_measured_loss(runs) if any(p.startswith("sharp/") or p == CORRELATION for p in panels) else None
    curves, curve_notes = _aggregate_curves(groups, panels, sharp, x)
    notes = list(dict.fromkeys(notes + curve_notes))  # same note from two metrics → once

    fig, csv_rows = _draw_figure(runs, groups, panels, curves, x, sharp, smooth, base, loss)
    if base is not None and not any(p in ("test/acc", CORRELATION) for p in panels):
        notes.append("baseline not drawn: neither the test/acc nor the correlation panel is shown")
    files = _write_files(fig, csv_rows, Path(out_dir), stem, formats)
    return PlotResult(files=files, notes=notes, panels=panels, figure=fig)


@dataclass
class _Baseline:
    """The final test accuracy drawn as a dashed reference line: one run's, or the median of several seeds'."""

    name: str
    test_acc: float
    runs: int = 1


def _load_baseline(baseline: str | Path | Run | None) -> _Baseline | None:
    """A run folder, or a folder with runs below it (seeds of one baseline: their median)."""
    if baseline is None:
        return None
    if isinstance(baseline, Run):
        return _Baseline(baseline.name, _final_test_acc(baseline))
    path = Path(baseline)
    if path.is_dir() and not (path / METRICS_FILE).exists():
        runs = as_runs(path)  # a folder of seeds, e.g. the demo's runs/demo/baseline
        return _Baseline(f"{path.name}, median of {len(runs)}", statistics.median(_final_test_acc(r) for r in runs), len(runs))
    run = load_run(path)
    return _Baseline(run.name, _final_test_acc(run))


def _final_test_acc(run: Run) -> float:
    for row in reversed(run.rows):
        value = finite_float(row.get("test/acc"))
        if value is not None:
            return value
    raise LnsgdError(
        f"baseline {run.path} has no test/acc in {run.path / METRICS_FILE}; "
        "pass a run that logged test accuracy"
    )


def _progress_notes(runs: list[Run]) -> list[str]:
    """Notes on runs that are still going or have logged nothing yet."""
    notes = [
        f"{r.name} is still in progress (no {SUMMARY_FILE}); drawn up to its last evaluation"
        for r in runs
        if not r.finished
    ]
    notes += [f"{r.name} has no evaluations yet in {METRICS_FILE}" for r in runs if not r.rows]
    return notes


def _aggregate_curves(
    groups: list[Group], panels: list[str], sharp: str | None, x: str
) -> tuple[dict[tuple[int, str], Curve], list[str]]:
    """Every (group index, metric) the panels need, aggregated over seeds once, and
    notes on runs that lack a metric or re-logged some of its rows."""
    needed = [m for m in panels if m != CORRELATION]
    if CORRELATION in panels:
        needed += [m for m in ("test/acc", sharp) if m not in needed]
    curves: dict[tuple[int, str], Curve] = {}
    notes: list[str] = []
    for gi, group in enumerate(groups):
        for metric in needed:
            series = []
            for run in group.runs:
                points, dropped = run_series(run, x, metric)
                if dropped:
                    notes.append(
                        f"{run.name}: {dropped} row(s) of {metric} share an {x} with a later "
                        "row (a resumed run re-logs them); the later ones are drawn"
                    )
                if points:
                    series.append(points)
                elif run.rows:
                    notes.append(f"{run.name} has no {metric} against {x}; left out of that panel")
            curves[gi, metric] = aggregate(series)
    return curves, notes


def _one_measured_loss(runs: Sequence[Run]) -> str | None:
    """The loss every run's sharpness was measured on ("flip p=0.2", "clean"), or None if none
    says; curves of tr∇²L of different losses on one axis would compare different functions."""
    by_loss: dict[str, list[str]] = {}
    for run in runs:
        for label in measured_losses(run):
            by_loss.setdefault(label, []).append(run.name)
    if len(by_loss) > 1:
        which = "; ".join(f"{label}: {', '.join(names[:3])}" for label, names in by_loss.items())
        raise LnsgdError(
            f"these runs measured sharpness on different losses ({which}); plot them separately, or measure every "
            "arm on one loss (track.sharpness.loss=flip:P in each recipe, e.g. the label-noise arm's)"
        )
    return next(iter(by_loss), None)


def _draw_figure(runs, groups, panels, curves, x, sharp, smooth, base, loss=None) -> tuple[Any, list[tuple]]:
    """One axis per panel, a shared legend below them and a title counting the runs;
    returns the figure and the CSV rows of every point drawn. ``loss`` names the loss the
    sharpness axes are of."""
    # Imported here: finding, grouping and comparing runs must not pay for matplotlib.
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.5 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    labels = [_legend_label(g) for g in groups]
    csv_rows: list[tuple] = []
    for ax, panel in zip(axes, panels):
        if panel == CORRELATION:
            csv_rows += _draw_correlation(ax, groups, curves, sharp, smooth, colours, labels)
            y_metric = "test/acc"
            if loss:
                ax.set_xlabel(f"{ax.get_xlabel()}, {loss} loss")
        else:
            csv_rows += _draw_metric(ax, panel, groups, curves, x, colours, labels)
            y_metric = panel
            if loss and panel.startswith("sharp/"):
                ax.set_ylabel(f"{ax.get_ylabel()}, {loss} loss")
        if y_metric.endswith("/acc"):
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        if base is not None and y_metric == "test/acc":
            csv_rows.append(_draw_baseline(ax, panel, base, x))
        ax.grid(True, alpha=0.3)
    _add_legend(fig, axes[: len(panels)])
    fig.suptitle(_figure_title(runs, groups))
    return fig, csv_rows


def _legend_label(group: Group) -> str:
    running = sum(not r.finished for r in group.runs)
    extra = f", {running} running" if running else ""
    return f"{group.label} (n={len(group.runs)}{extra})"


def _draw_metric(ax, panel, groups, curves, x, colours, labels) -> list[tuple]:
    """`panel`'s metric against x: per group the median line, the min–max band when
    the group has several runs, and where each phase starts; returns the CSV rows."""
    title, y_label = METRIC_LABELS.get(panel, (panel, panel))
    ax.set_title(title)
    ax.set_xlabel(METRIC_LABELS[x][1])
    ax.set_ylabel(y_label)
    rows: list[tuple] = []
    values: list[float] = []
    for gi, group in enumerate(groups):
        c = curves[gi, panel]
        if not c.x:
            continue
        values += c.lo + c.hi
        line = ax.plot(c.x, c.median, color=colours[gi], lw=1.6, label=labels[gi])
        if len(group.runs) > 1:
            ax.fill_between(c.x, c.lo, c.hi, color=colours[gi], alpha=0.2, lw=0)
        if len(c.x) == 1:  # a lone point draws no line
            line[0].set_marker("o")
        _mark_phase_starts(ax, group.runs[0], x, colours[gi])
        for i in range(len(c.x)):
            rows.append((panel, gi, group.label, x, c.x[i], panel, c.median[i], c.lo[i], c.hi[i], c.n[i]))
    if _log_scale(panel, values):
        ax.set_yscale("log")
    return rows


def _mark_phase_starts(ax, run: Run, x: str, colour: str) -> None:
    """A dotted vertical line, named, where each of the run's phases starts."""
    for start, phase in _phase_starts(run, x):
        ax.axvline(start, color=colour, ls=":", lw=0.8)
        ax.annotate(phase, (start, 1), xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                    va="top", fontsize=7, color=colour)


def _phase_starts(run: Run, x: str) -> list[tuple[float, str]]:
    """(x, phase) where a `phase` column (e.g. memorize → fit) starts; nothing
    when the run has one phase or none."""
    starts, current = [], None
    for row in run.rows:
        phase, xv = row.get("phase"), finite_float(row.get(x))
        if isinstance(phase, str) and phase != current and xv is not None:
            starts.append((xv, phase))
            current = phase
    return starts if len(starts) > 1 else []


def _draw_correlation(ax, groups, curves, sharp, smooth, colours, labels) -> list[tuple]:
    """Test accuracy against sharpness (Damian et al. 2021, Fig. 3): per group the
    medians at the x values where both exist, running-mean smoothed; returns the CSV rows."""
    sharp_label = METRIC_LABELS.get(sharp, (sharp, sharp))[1]
    ax.set_title("Test accuracy vs. sharpness")
    ax.set_xlabel(sharp_label + (f"  (running mean of {smooth} evals)" if smooth > 1 else ""))
    ax.set_ylabel("test accuracy (%)")
    rows: list[tuple] = []
    all_sharp = []
    for gi, group in enumerate(groups):
        s, a = curves[gi, sharp], curves[gi, "test/acc"]
        acc_at = {xv: (m, n) for xv, m, n in zip(a.x, a.median, a.n)}
        joined = [(sm, *acc_at[xv], min(n, acc_at[xv][1])) for xv, sm, n in zip(s.x, s.median, s.n) if xv in acc_at]
        if not joined:
            continue
        sharp_s = running_mean([j[0] for j in joined], smooth)
        acc_s = running_mean([j[1] for j in joined], smooth)
        counts = [j[3] for j in joined]
        all_sharp += sharp_s
        ax.plot(sharp_s, acc_s, color=colours[gi], lw=1.4, marker=".", ms=3, label=labels[gi])
        # The last point is marked: training moves the curve towards it.
        ax.plot(sharp_s[-1:], acc_s[-1:], color=colours[gi], marker="o", ms=6)
        for i in range(len(joined)):
            n_window = min(counts[max(0, i - smooth + 1) : i + 1])
            rows.append(("correlation", gi, group.label, sharp, sharp_s[i], "test/acc", acc_s[i], "", "", n_window))
    if _log_scale(sharp, all_sharp):
        ax.set_xscale("log")
    # A legend entry (collected into the figure legend) explains the end markers.
    ax.plot([], [], color="0.4", marker="o", ls="none", label="last evaluation (correlation)")
    return rows


def _draw_baseline(ax, panel: str, base: _Baseline, x: str) -> tuple:
    """A dashed line at the baseline's final test accuracy; returns its CSV row."""
    ax.axhline(base.test_acc, color="0.3", ls="--", lw=1.2, label=f"baseline: {base.name} ({base.test_acc:.1%})")
    return (panel, "baseline", base.name, x, "", "test/acc", base.test_acc, "", "", base.runs)


def _add_legend(fig, axes) -> None:
    """One legend for the figure, below the panels, so it never covers data."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)


def _figure_title(runs: list[Run], groups: list[Group]) -> str:
    n_running = sum(not r.finished for r in runs)
    return (
        f"{len(runs)} run{'s' * (len(runs) != 1)} in {len(groups)} group"
        f"{'s' * (len(groups) != 1)}"
        + (f" ({n_running} in progress)" if n_running else "")
        + (" — line: median over seeds, band: min–max" if len(runs) > len(groups) else "")
    )


def _write_files(fig, csv_rows: list[tuple], out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """<stem>.<ext> per format, then <stem>.csv; returns the paths in that order."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LnsgdError(f"--out {out_dir} is a file; pass a folder to write figures into")
    files = [out_dir / f"{stem}.{ext}" for ext in formats]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in files:
            fig.savefig(path, dpi=150)
        files.append(write_csv(out_dir / f"{stem}.csv", CSV_COLUMNS, csv_rows))
    except OSError as exc:  # under a regular file, read-only, full, or not ours
        where = exc.filename or out_dir
        raise LnsgdError(f"cannot write figures to --out {out_dir} ({exc.strerror or exc}: {where}); pass a writable folder") from None
    return files
