"""Commands that read run folders back: plot and compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lnsgd.cli.app import app, console, err_console, fail, friendly

RunsArg = Annotated[list[Path], typer.Argument(help="run folders, or folders containing runs (a sweep)", show_default=False)]



IgnoreOpt = Annotated[
    Optional[list[str]], typer.Option("--ignore", help="recipe key to ignore when grouping (repeatable), e.g. init.checkpoint")
]



@app.command()
@friendly
def plot(
    runs: RunsArg,
    out: Annotated[Path, typer.Option("--out", help="folder for plot.png, plot.pdf and plot.csv")] = Path("plots"),
    x: Annotated[str, typer.Option("--x", help="x axis: epoch, step or time_s")] = "epoch",
    metrics: Annotated[
        Optional[list[str]], typer.Option("--metrics", help="panel metric (repeatable); replaces the default panels")
    ] = None,
    baseline: Annotated[
        Optional[Path], typer.Option("--baseline", help="run whose final test accuracy is drawn dashed (a folder of seeds: their median)")
    ] = None,
    smooth: Annotated[int, typer.Option("--smooth", min=1, help="running-average window of the correlation panel")] = 1,
    ignore: IgnoreOpt = None,
) -> None:
    """Figures from run folders: accuracy, sharpness and accuracy-vs-sharpness, seeds aggregated.

    Example (after the lnsgd sweep example): lnsgd plot runs/quickstart-lr-seed --out plots
    """
    from lnsgd.report import plot_runs

    if x not in ("epoch", "step", "time_s"):
        raise fail(f"--x {x!r}: expected epoch, step or time_s")
    result = plot_runs(runs, out, x=x, metrics=metrics or None, baseline=baseline, smooth=smooth, ignore=ignore or ())
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for f in result.files:
        console.print(str(f), highlight=False)



@app.command()
@friendly
def compare(
    runs: RunsArg,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="also write the table as CSV")] = None,
    ignore: IgnoreOpt = None,
) -> None:
    """Final metrics per group of runs: median \\[min, max] over seeds.

    Example (after the lnsgd sweep example): lnsgd compare runs/quickstart-lr-seed --csv final.csv
    """  # \\[: rich reads [..] as markup
    from lnsgd.report import compare_runs, compare_table, write_csv

    columns, rows = compare_runs(runs, ignore=ignore or ())
    console.print(compare_table(columns, rows))
    if csv is not None:
        console.print(str(write_csv(csv, columns, rows)), highlight=False)
