"""Figures and comparison tables from run folders, and nothing else.

Everything here reads what the training loop left on disk (``recipe.yaml``,
``metrics.jsonl``, ``summary.json``); it never imports torch or talks to wandb, so
it runs on a laptop against folders copied back from a cluster, and against runs
that are still going.

The modules, in the order the data flows through them:

- ``runs``: find and load run folders, flatten recipes, group runs that differ only
  in seed, and aggregate a metric over a group's seeds (median, min, max per x).
- ``plot``: draw the figures (``plot_runs``) and write the CSV of what is drawn.
- ``compare``: final metrics per group (``compare_runs``), as CSV or a rich table.
"""

from lnsgd.report.compare import compare_runs, compare_table, write_csv
from lnsgd.report.plot import PlotResult, plot_runs
from lnsgd.report.runs import Group, Run, find_runs, flatten, group_runs, load_run, read_metrics

__all__ = [
    "Group",
    "PlotResult",
    "Run",
    "compare_runs",
    "compare_table",
    "find_runs",
    "flatten",
    "group_runs",
    "load_run",
    "plot_runs",
    "read_metrics",
    "write_csv",
]
