"""Figures and comparison tables from run folders, and nothing else.

Everything here reads what the training loop left on disk (``recipe.yaml``,
``metrics.jsonl``, ``summary.json``); it never imports torch or talks to wandb, so
it runs on a laptop against folders copied back from a cluster, and against runs
that are still going.

The pieces, top to bottom:

1. *Finding runs.* A path is either a run folder (it holds ``recipe.yaml`` and
   ``metrics.jsonl``) or a folder with run folders somewhere below it (a sweep).
2. *Grouping.* Runs whose resolved recipes differ only in ``seed`` (and in fields
   that differ per run by nature: ``name``, ``device``, ``log.dir``,
   ``log.wandb.*``) are seeds of one configuration, a *group*. Which recipe keys
   tell the groups apart is found from the flattened recipes, and those keys name
   the groups in legends and tables (``optim.lr=0.5``).
3. *Aggregation over seeds.* For one group and one metric, every x value that any
   of its runs logged is kept (the union); at each x the median, min and max are
   taken over the runs that have a value there, and ``n_runs`` says how many did.
   Seeds logged at the same epochs/steps line up exactly; with ``x="time_s"`` they
   rarely do, so each point then usually comes from one run.
4. *Figures* in the layout of Damian, Ma & Lee (2021), Figure 3: train accuracy,
   test accuracy, the expected loss's gap to its minimum (when logged) and
   sharpness against x, and test accuracy against sharpness, written as PNG and
   PDF together with a CSV of exactly the values drawn.
5. *Comparison* of final metrics per group, as rows for a CSV or a rich table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lnsgd.errors import LnsgdError
from lnsgd.track import read_jsonl

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

X_METRICS = ("epoch", "step", "time_s")

# Every metric the training loop may log (DESIGN.md, "Metric names"), in the order
# a table should list them.
KNOWN_METRICS = (
    "epoch",
    "step",
    "time_s",
    "lr",
    "lambda_eff",
    "train/loss",
    "train/acc",
    "train/expected_loss",
    "train/expected_loss_gap",
    "test/loss",
    "test/acc",
    "train/noisy_loss",
    "grad/norm",
    "weight/norm",
    "sharp/trace_hessian",
    "sharp/lambda_max",
    "sharp/trace_gn",
    "sharp/R",
    "throughput/img_per_s",
)

# The name that asks for the test-accuracy-against-sharpness panel in `metrics`.
CORRELATION = "correlation"

# The expected loss minus its minimum over predictions: the distance to the manifold of
# expected-loss minimizers that the theory's flattening moves along. A default panel
# whenever a run logged it.
GAP = "train/expected_loss_gap"

# Recipe keys that differ between runs of one configuration by nature, not by
# design; a key is ignored when it equals an entry or starts with "<entry>.".
PER_RUN_KEYS = ("seed", "name", "device", "log.dir", "log.wandb")

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
    "throughput/img_per_s": ("Throughput", "images / s"),
}


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path  # the run folder
    name: str  # the folder name (a longer relative path when folder names collide)
    recipe: dict  # recipe.yaml, the resolved recipe as run
    rows: list[dict]  # metrics.jsonl, one dict per evaluation, in file order
    finished: bool  # summary.json exists
    summary: dict | None  # summary.json, or None while the run is in progress


@dataclass
class Group:
    """Runs of one configuration (they differ only in seed and per-run fields)."""

    label: str  # legend/table name, e.g. "optim.lr=0.5, noise.kind=flip"
    differing: dict  # the values of the recipe keys that tell groups apart
    runs: list[Run]


@dataclass
class PlotResult:
    """What `plot_runs` wrote and what the user should be told."""

    files: list[Path]  # the figures (PNG, PDF by default), then the CSV last
    notes: list[str]  # panels skipped, runs in progress, ...; for the CLI to print
    panels: list[str] = field(default_factory=list)  # metric per axis, or "correlation"
    figure: Any = None  # the matplotlib Figure (not registered with pyplot)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (the file itself, or its run folder).

    The last line may be torn while a run is writing it, so an unparsable last
    line is dropped; an unparsable line anywhere else is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise LnsgdError(f"cannot read {path}: no such file")
    return read_jsonl(path)


def is_run_folder(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file() and (path / METRICS_FILE).is_file()


def load_run(path: str | Path) -> Run:
    """Read one run folder: recipe, metrics and (when finished) summary."""
    path = Path(path)
    if not is_run_folder(path):
        missing = [f for f in (RECIPE_FILE, METRICS_FILE) if not (path / f).is_file()]
        raise LnsgdError(f"{path} is not a run folder (no {'/'.join(missing)})")
    recipe_file = path / RECIPE_FILE
    try:
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LnsgdError(f"{recipe_file}: not valid YAML ({exc})") from exc
    if not isinstance(recipe, dict):
        raise LnsgdError(f"{recipe_file}: expected a mapping of recipe fields")
    summary = None
    summary_file = path / SUMMARY_FILE
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LnsgdError(f"{summary_file}: not valid JSON ({exc.msg})") from exc
        if not isinstance(summary, dict):
            raise LnsgdError(f"{summary_file}: expected a JSON object")
    return Run(
        path=path,
        name=path.resolve().name,
        recipe=recipe,
        rows=read_metrics(path / METRICS_FILE),
        finished=summary is not None,
        summary=summary,
    )


def _run_folders_below(root: Path) -> list[Path]:
    """Run folders at any depth below `root`, in sorted order; run folders are
    not searched further (their checkpoints/ and wandb/ hold no runs)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_folder(here):
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return found


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every run in `paths`; each is a run folder or a folder with runs below it."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise LnsgdError("no run folders given; pass a run folder or a sweep folder")
    runs: list[Run] = []
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise LnsgdError(f"{path} does not exist; pass a run folder or a sweep folder")
        if is_run_folder(path):
            folders = [path]
        elif path.is_dir():
            folders = _run_folders_below(path)
        else:
            folders = []
        if not folders:
            raise LnsgdError(
                f"{path} is not a run folder (no {RECIPE_FILE}/{METRICS_FILE}) and contains none"
            )
        for folder in folders:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                runs.append(load_run(folder))
    _disambiguate_names(runs)
    return runs


def _disambiguate_names(runs: list[Run]) -> None:
    """Sweeps may nest runs as lr=0.5/seed=0, lr=1.0/seed=0: lengthen the names
    that collide with parent folder names until they don't."""
    depth = 1
    while depth < 8:
        names = [r.name for r in runs]
        clashing = {n for n in names if names.count(n) > 1}
        if not clashing:
            return
        depth += 1
        for run in runs:
            if run.name in clashing:
                parts = run.path.resolve().parts[-depth:]
                run.name = "/".join(parts)


def _as_runs(paths_or_runs: Any) -> list[Run]:
    if isinstance(paths_or_runs, Run):
        return [paths_or_runs]
    if isinstance(paths_or_runs, (str, Path)):
        return find_runs([paths_or_runs])
    items = list(paths_or_runs)
    if not items:
        raise LnsgdError("no runs found: no run folders given")
    if all(isinstance(i, Run) for i in items):
        return items
    runs = [i for i in items if isinstance(i, Run)]
    paths = [i for i in items if not isinstance(i, Run)]
    return runs + find_runs(paths)


# ----------------------------------------------------------------------- grouping


def flatten(recipe: dict, prefix: str = "") -> dict[str, object]:
    """Nested mapping → {"optim.lr": 0.5, ...}. Lists stay values; an empty
    mapping stays as a value so that its key is not lost."""
    flat: dict[str, object] = {}
    for key, value in recipe.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)


_MISSING = object()  # a key one recipe has and another lacks


def _format_value(value: object) -> str:
    if value is _MISSING:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _checkpoint_names(paths: list[object]) -> list[str]:
    """Readable names for init checkpoints: the run folder a checkpoint belongs
    to (".../adversarial/final.pt" → "adversarial", ".../adversarial/checkpoints/
    last.pt" → "adversarial/last"), with more of the path where names collide."""

    def short(value: object, extra: int) -> str:
        if value is None:
            return "random"
        if not isinstance(value, str):
            return _format_value(value)
        parts = list(Path(value).parts)
        stem = Path(value).stem
        folder = parts[:-1]
        if folder and folder[-1] == "checkpoints":
            folder = folder[:-1]
        head = "/".join(folder[len(folder) - 1 - extra :]) if folder else ""
        if stem == "final" and head:
            return head
        return f"{head}/{stem}" if head else stem

    for extra in range(8):
        names = [short(p, extra) for p in paths]
        distinct = {json.dumps(p, default=str) for p in paths}
        if len(set(names)) == len(distinct):
            return names
    return [_format_value(p) for p in paths]


def _sort_key(value: object) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    if value is None or value is _MISSING:
        return (2, 0.0, "")
    return (1, 0.0, _format_value(value))


def _common_name(runs: list[Run]) -> str:
    names = [str(r.recipe.get("name") or r.path.name) for r in runs]
    if len(set(names)) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    # "cifar-lr0.5-s0", "cifar-lr0.5-s1" → "cifar-lr0.5"
    prefix = re.sub(r"([-_. ]+(seed|s)[-_.= ]*|[-_.= ]+)$", "", prefix)
    return prefix or "runs"


def group_runs(runs: Sequence[Run], ignore: Iterable[str] = ()) -> list[Group]:
    """Runs that differ only in seed (and per-run fields) → one Group each.

    `ignore` adds recipe keys (dotted; a key also covers everything below it)
    that should not split groups, e.g. "init.checkpoint" when each seed starts
    from its own init. Groups are sorted by their differing values.
    """
    runs = list(runs)
    if not runs:
        raise LnsgdError("no runs found")
    skip = tuple(PER_RUN_KEYS) + tuple(ignore)
    flats = [{k: v for k, v in flatten(r.recipe).items() if not _ignored(k, skip)} for r in runs]

    by_config: dict[str, list[int]] = {}
    for index, flat in enumerate(flats):
        key = json.dumps(flat, sort_keys=True, default=str)
        by_config.setdefault(key, []).append(index)
    members = list(by_config.values())
    configs = [flats[m[0]] for m in members]

    all_keys = sorted({k for c in configs for k in c})
    differing_keys = [
        k
        for k in all_keys
        if len({json.dumps(c.get(k, "\0unset"), sort_keys=True, default=str) for c in configs}) > 1
    ]
    differing = [{k: c.get(k, _MISSING) for k in differing_keys} for c in configs]
    order = sorted(
        range(len(configs)), key=lambda i: [_sort_key(differing[i][k]) for k in differing_keys]
    )

    # Label text per key; checkpoint paths are shortened jointly so they stay distinct.
    shown = {k: [_format_value(d[k]) for d in differing] for k in differing_keys}
    for k in differing_keys:
        if k == "init.checkpoint" or k.endswith(".checkpoint"):
            shown[k] = _checkpoint_names([d[k] for d in differing])

    def key_name(k: str) -> str:
        return "init" if k == "init.checkpoint" else k

    groups = []
    for i in order:
        group_runs_ = [runs[j] for j in members[i]]
        if differing_keys:
            label = ", ".join(f"{key_name(k)}={shown[k][i]}" for k in differing_keys)
        else:
            label = _common_name(group_runs_)
        plain = {k: (None if v is _MISSING else v) for k, v in differing[i].items()}
        groups.append(Group(label=label, differing=plain, runs=group_runs_))
    return groups


# -------------------------------------------------------------------- aggregation


def _number(value: object) -> float | None:
    """A finite float, or None for missing, null, non-numeric or non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def run_series(run: Run, x: str, metric: str) -> tuple[list[tuple[float, float]], int]:
    """(x, value) pairs of one run, sorted by x; rows lacking either are skipped.

    When several rows share an x (a resumed run may re-log an evaluation), the
    last one in the file wins; the second value returned counts the rows dropped.
    """
    points: dict[float, float] = {}
    duplicates = 0
    for row in run.rows:
        xv, yv = _number(row.get(x)), _number(row.get(metric))
        if xv is None or yv is None:
            continue
        if xv in points:
            duplicates += 1
        points[xv] = yv
    return sorted(points.items()), duplicates


@dataclass
class Curve:
    """One group's metric over x: median and min–max over the runs that have a
    value at each x (the union of the runs' x values)."""

    x: list[float]
    median: list[float]
    lo: list[float]
    hi: list[float]
    n: list[int]


def aggregate(series: Sequence[Sequence[tuple[float, float]]]) -> Curve:
    at: dict[float, list[float]] = {}
    for points in series:
        for xv, yv in points:
            at.setdefault(xv, []).append(yv)
    xs = sorted(at)
    return Curve(
        x=xs,
        median=[statistics.median(at[v]) for v in xs],
        lo=[min(at[v]) for v in xs],
        hi=[max(at[v]) for v in xs],
        n=[len(at[v]) for v in xs],
    )


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing running average: point i is the mean of points max(0, i-window+1)..i."""
    # fsum per window rather than a rolling sum: with window 1 the values come back
    # bit for bit, and the CSV stays an exact record of what is drawn.
    return [
        math.fsum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
        for i in range(len(values))
    ]


# ------------------------------------------------------------------------ figures


def _has_metric(runs: Iterable[Run], metric: str) -> bool:
    return any(_number(row.get(metric)) is not None for r in runs for row in r.rows)


def _panel_list(
    runs: list[Run], metrics: Sequence[str] | None
) -> tuple[list[str], str | None, list[str]]:
    """The y panels to draw, the sharpness metric for the correlation panel, and
    notes about requested panels that no run has."""
    notes = []
    present = {k for r in runs for row in r.rows for k in row}
    sharp_default = next((m for m in ("sharp/R", "sharp/trace_hessian") if _has_metric(runs, m)), None)
    if metrics is None:
        wanted = ["train/acc", "test/acc", *([GAP] if _has_metric(runs, GAP) else []), sharp_default or "sharp/R",
                  CORRELATION]
        sharp = sharp_default
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


def _final_test_acc(run: Run) -> float:
    for row in reversed(run.rows):
        value = _number(row.get("test/acc"))
        if value is not None:
            return value
    raise LnsgdError(
        f"baseline {run.path} has no test/acc in {run.path / METRICS_FILE}; "
        "pass a run that logged test accuracy"
    )


def _phase_starts(run: Run, x: str) -> list[tuple[float, str]]:
    """(x, phase) where a `phase` column (e.g. memorize → fit) starts; nothing
    when the run has one phase or none."""
    starts, current = [], None
    for row in run.rows:
        phase, xv = row.get("phase"), _number(row.get(x))
        if isinstance(phase, str) and phase != current and xv is not None:
            starts.append((xv, phase))
            current = phase
    return starts if len(starts) > 1 else []


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
    runs = _as_runs(paths_or_runs)
    if not runs:
        raise LnsgdError("no runs found")
    groups = group_runs(runs, ignore=ignore)
    base_run = None
    if baseline is not None:
        base_run = baseline if isinstance(baseline, Run) else load_run(baseline)
        base_acc = _final_test_acc(base_run)

    notes = [
        f"{r.name} is still in progress (no {SUMMARY_FILE}); drawn up to its last evaluation"
        for r in runs
        if not r.finished
    ]
    notes += [f"{r.name} has no evaluations yet in {METRICS_FILE}" for r in runs if not r.rows]
    panels, sharp, panel_notes = _panel_list(runs, metrics)
    notes += panel_notes
    if not panels:
        raise LnsgdError("nothing to plot: " + "; ".join(panel_notes))

    # Aggregate every (group, metric) once; notes for runs/groups lacking data.
    curves: dict[tuple[int, str], Curve] = {}
    needed = [m for m in panels if m != CORRELATION]
    if CORRELATION in panels:
        needed += [m for m in ("test/acc", sharp) if m not in needed]
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
    notes = list(dict.fromkeys(notes))  # same note from two metrics → once

    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.5 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    colours = [f"C{i % 10}" for i in range(len(groups))]
    csv_rows: list[tuple] = []
    x_label = METRIC_LABELS[x][1]

    def legend_label(group: Group) -> str:
        running = sum(not r.finished for r in group.runs)
        extra = f", {running} running" if running else ""
        return f"{group.label} (n={len(group.runs)}{extra})"

    for ax, panel in zip(axes, panels):
        if panel == CORRELATION:
            labels = [legend_label(g) for g in groups]
            _draw_correlation(ax, groups, curves, sharp, smooth, colours, labels, csv_rows)
            y_metric = "test/acc"
        else:
            y_metric = panel
            title, y_label = METRIC_LABELS.get(panel, (panel, panel))
            ax.set_title(title)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            values = []
            for gi, group in enumerate(groups):
                c = curves[gi, panel]
                if not c.x:
                    continue
                values += c.lo + c.hi
                line = ax.plot(c.x, c.median, color=colours[gi], lw=1.6, label=legend_label(group))
                if len(group.runs) > 1:
                    ax.fill_between(c.x, c.lo, c.hi, color=colours[gi], alpha=0.2, lw=0)
                if len(c.x) == 1:  # a lone point draws no line
                    line[0].set_marker("o")
                for start, phase in _phase_starts(group.runs[0], x):
                    ax.axvline(start, color=colours[gi], ls=":", lw=0.8)
                    ax.annotate(phase, (start, 1), xycoords=("data", "axes fraction"),
                                xytext=(2, -2), textcoords="offset points", va="top",
                                fontsize=7, color=colours[gi])
                for i in range(len(c.x)):
                    csv_rows.append((panel, gi, group.label, x, c.x[i], panel,
                                     c.median[i], c.lo[i], c.hi[i], c.n[i]))
            if _log_scale(panel, values):
                ax.set_yscale("log")
        if y_metric.endswith("/acc"):
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        if base_run is not None and y_metric == "test/acc":
            ax.axhline(base_acc, color="0.3", ls="--", lw=1.2,
                       label=f"baseline: {base_run.name} ({base_acc:.1%})")
            csv_rows.append((panel, "baseline", base_run.name, x, "", "test/acc",
                             base_acc, "", "", 1))
        ax.grid(True, alpha=0.3)

    if base_run is not None and not any(p in ("test/acc", CORRELATION) for p in panels):
        notes.append("baseline not drawn: neither the test/acc nor the correlation panel is shown")

    # One legend for the figure, below the panels, so it never covers data.
    handles, labels = {}, []
    for ax in axes[: len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center",
                   ncols=min(len(labels), 3), frameon=False)
    n_running = sum(not r.finished for r in runs)
    fig.suptitle(
        f"{len(runs)} run{'s' * (len(runs) != 1)} in {len(groups)} group"
        f"{'s' * (len(groups) != 1)}"
        + (f" ({n_running} in progress)" if n_running else "")
        + (" — line: median over seeds, band: min–max" if len(runs) > len(groups) else "")
    )

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LnsgdError(f"--out {out_dir} is a file; pass a folder to write figures into")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / f"{stem}.{ext}" for ext in formats]
    for path in files:
        fig.savefig(path, dpi=150)
    files.append(write_csv(out_dir / f"{stem}.csv", CSV_COLUMNS, csv_rows))
    return PlotResult(files=files, notes=notes, panels=panels, figure=fig)


def _draw_correlation(ax, groups, curves, sharp, smooth, colours, labels, csv_rows) -> None:
    sharp_label = METRIC_LABELS.get(sharp, (sharp, sharp))[1]
    ax.set_title("Test accuracy vs. sharpness")
    ax.set_xlabel(sharp_label + (f"  (running mean of {smooth} evals)" if smooth > 1 else ""))
    ax.set_ylabel("test accuracy (%)")
    all_sharp = []
    for gi, group in enumerate(groups):
        s, a = curves[gi, sharp], curves[gi, "test/acc"]
        acc_at = {xv: (m, n) for xv, m, n in zip(a.x, a.median, a.n)}
        joined = [(sm, *acc_at[xv], min(n, acc_at[xv][1]))
                  for xv, sm, n in zip(s.x, s.median, s.n) if xv in acc_at]
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
            csv_rows.append(("correlation", gi, group.label, sharp, sharp_s[i], "test/acc",
                             acc_s[i], "", "", n_window))
    if _log_scale(sharp, all_sharp):
        ax.set_xscale("log")
    # A legend entry (collected into the figure legend) explains the end markers.
    ax.plot([], [], color="0.4", marker="o", ls="none", label="last evaluation (correlation)")


# --------------------------------------------------------------------- comparison

COMPARE_COLUMNS = ("group", "label", "metric", "median", "min", "max", "n_runs", "n_finished")


def _final_values(run: Run) -> dict[str, float]:
    """Per metric, the last finite value the run logged (sharpness may be measured
    only every K evaluations, so it can come from an earlier row than the last),
    plus the numeric entries of summary.json as "summary.<dotted key>"."""
    values: dict[str, float] = {}
    for row in run.rows:
        for key, value in row.items():
            number = _number(value)
            if number is not None:
                values[key] = number
    if run.summary:
        for key, value in flatten(run.summary).items():
            # final.* repeats the last metrics row; phases/environment are bookkeeping.
            if key.startswith(("final.", "phases.", "environment.")):
                continue
            number = _number(value)
            if number is not None:
                values[f"summary.{key}"] = number
    return values


def _metric_order(name: str) -> tuple:
    if name in KNOWN_METRICS:
        return (0, KNOWN_METRICS.index(name), name)
    return (2 if name.startswith("summary.") else 1, 0, name)


def compare_runs(paths_or_runs: Any, ignore: Iterable[str] = ()) -> tuple[list[str], list[list]]:
    """Final metrics per group: median and min–max over the group's runs.

    Long format, columns `COMPARE_COLUMNS`: one row per (group, metric);
    n_runs counts the runs with a finite value of that metric, n_finished those
    of them with a summary.json. Non-finite values (a diverged run) are left out.
    """
    runs = _as_runs(paths_or_runs)
    groups = group_runs(runs, ignore=ignore)
    rows = []
    for gi, group in enumerate(groups):
        finals = [(_final_values(r), r.finished) for r in group.runs]
        names = sorted({k for values, _ in finals for k in values}, key=_metric_order)
        for metric in names:
            have = [(values[metric], done) for values, done in finals if metric in values]
            numbers = [v for v, _ in have]
            rows.append([gi, group.label, metric, statistics.median(numbers), min(numbers),
                         max(numbers), len(have), sum(done for _, done in have)])
    return list(COMPARE_COLUMNS), rows


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """Write `rows` under a header of `columns`; floats keep full precision."""
    path = Path(path)
    if path.is_dir():
        raise LnsgdError(f"--csv {path} is a folder; pass a file name such as {path / 'compare.csv'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def _format_number(metric: str, value: float) -> str:
    if metric.endswith("/acc"):
        return f"{value:.2%}"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def compare_table(columns: Sequence[str], rows: Sequence[Sequence]):
    """A rich Table of `compare_runs` output: one row per metric, one column per
    group, cells "median [min, max]" (just the value when all seeds agree)."""
    from rich.markup import escape
    from rich.table import Table

    col = {name: i for i, name in enumerate(columns)}
    groups: dict[object, str] = {}
    # Runs per group = the most runs behind any of its metrics.
    runs_in: dict[object, tuple[int, int]] = {}
    for row in rows:
        g = row[col["group"]]
        groups.setdefault(g, str(row[col["label"]]))
        n, done = int(row[col["n_runs"]]), int(row[col["n_finished"]])
        old = runs_in.get(g, (0, 0))
        runs_in[g] = (max(old[0], n), max(old[1], done))
    cells: dict[str, dict[object, str]] = {}
    for row in rows:
        g, metric, n = row[col["group"]], row[col["metric"]], int(row[col["n_runs"]])
        med, lo, hi = (row[col[k]] for k in ("median", "min", "max"))
        text = _format_number(metric, med)
        if lo != hi:
            text += f" [{_format_number(metric, lo)}, {_format_number(metric, hi)}]"
        if n < runs_in[g][0]:
            text += f" (n={n})"
        cells.setdefault(metric, {})[g] = text

    table = Table(title=escape("Final metrics per group: median [min, max] over seeds"))
    table.add_column("metric", style="bold")
    for g, label in groups.items():
        n, done = runs_in[g]
        running = f", {n - done} running" if n > done else ""
        table.add_column(escape(f"{label}\n({n} run{'s' * (n != 1)}{running})"), justify="right")
    for metric in sorted(cells, key=_metric_order):
        table.add_row(escape(metric), *(escape(cells[metric].get(g, "—")) for g in groups))
    return table
