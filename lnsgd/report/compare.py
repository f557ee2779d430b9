"""Final metrics per group, as rows for a CSV or a rich table."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lnsgd.errors import LnsgdError
from lnsgd.report.runs import KNOWN_METRICS, Run, as_runs, finite_float, flatten, group_runs

# --------------------------------------------------------------------- comparison

COMPARE_COLUMNS = ("group", "label", "metric", "median", "min", "max", "n_runs", "n_finished")


def _final_values(run: Run) -> dict[str, float]:
    """Per metric, the last finite value the run logged (sharpness may be measured
    only every K evaluations, so it can come from an earlier row than the last),
    plus the numeric entries of summary.json as "summary.<dotted key>"."""
    values: dict[str, float] = {}
    for row in run.rows:
        for key, value in row.items():
            number = finite_float(value)
            if number is not None:
                values[key] = number
    if run.summary:
        for key, value in flatten(run.summary).items():
            # final.* repeats the last metrics row; phases/environment are bookkeeping.
            if key.startswith(("final.", "phases.", "environment.")):
                continue
            number = finite_float(value)
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
    runs = as_runs(paths_or_runs)
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
