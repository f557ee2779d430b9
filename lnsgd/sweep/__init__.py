"""Sweeps: a grid of runs from one recipe, as child processes here or as a submitit job array.

Read the modules in this order, one step of a sweep each:

1. ``grid``: ``--grid optim.lr=0.5,1,2 --grid seed=0,1,2`` (or a sweep spec file) is
   expanded into points, the cartesian product of the axes, or with ``zip`` the axes
   paired element by element. Each point is a list of ``key=value`` overrides of the base
   recipe and gets a short, readable, filesystem-safe id made of the last key component
   and the value: ``lr=0.5,seed=0``.
2. ``plan``: every point's recipe is loaded and validated before anything runs, so a grid
   key that is not a recipe field, or a value of the wrong type, is one clear error and no
   run starts. A point's run folder is ``<log.dir>/<sweep>/<id>`` and its recipe name is
   ``<sweep>/<id>``; runs of a sweep share the wandb group ``<sweep>`` and carry the grid
   values as tags (``lr=0.5``). Sweep spec files (``recipes/sweeps/*.sweep``) are read
   here; their format is in ``lnsgd.sweep.plan``'s docstring.
   *State.* ``<log.dir>/<sweep>/sweep.json`` lists the recipe, base overrides and grid the
   sweep was built from, and per point its overrides, folder and status (pending, running,
   done, failed, interrupted). A folder built from a different recipe or grid is refused
   unless ``force`` (which keeps the runs the new sweep would redo identically and
   deletes the rest). A lock file keeps two sweeps from driving the same folder at once.
3. ``run``: ``run_sweep`` is idempotent: a point whose ``summary.json`` has ``epochs ==
   train.epochs`` is skipped, one with ``checkpoints/last.pt`` is resumed, the rest start
   fresh; it hands them to an executor and records what it reports.
4. Executors:
   - ``local`` (``--executor process``): up to ``jobs`` runs at once, each ``python -m
     lnsgd train RECIPE overrides... --out <point> --quiet [--resume]`` in its own
     session, with stdout+stderr in ``<point>/train.log``, pinned round robin to one GPU
     when several are visible. SIGINT/SIGTERM/SIGHUP to the sweep stops launching and
     forwards SIGTERM once to every child, which checkpoints and exits 130; the sweep then
     raises ``RunInterrupted``: rerunning the same command continues.
   - ``slurm`` (``--executor submitit``): one job array of ``PointJob``s, each training one
     point in-process. Slurm sends SIGUSR2 only as the time-limit warning submitit
     configures with ``--signal`` (submitit's local backend sends it before its timeout
     too); preemption and requeueing send SIGTERM. Either way the training loop writes
     ``last.pt`` after the current step; on SIGUSR2 submitit then calls ``checkpoint()``
     and requeues; on SIGTERM the job exits without a result and Slurm requeues it. The
     requeued job resumes exactly; the sweep keeps watching it (shown as requeued), and a
     rerun watches a job Slurm still holds rather than submit another. sbatch's refusals
     are one line naming the option. Submitit is imported only here.
5. ``status``: `lnsgd sweep-status`, each point's status and last metrics.
"""

from __future__ import annotations

from lnsgd.sweep.grid import Axis, expand, parse_grid_option, point_ids, point_labels, safe_name, split_values, value_text
from lnsgd.sweep.local import ProcessExecutor
from lnsgd.sweep.plan import (
    STATUSES,
    SWEEP_FILE,
    Point,
    SweepPlan,
    SweepSpec,
    check_existing,
    is_sweep_spec,
    plan_sweep,
    read_sweep,
    run_state,
    sweep_lock,
    write_sweep,
)
from lnsgd.sweep.run import SweepResult, Task, run_sweep, train_command
from lnsgd.sweep.slurm import SubmititExecutor, SubmititOptions, import_submitit, parse_slurm_options
from lnsgd.sweep.status import status_rows, status_table

__all__ = [
    "STATUSES", "SWEEP_FILE", "Axis", "Point", "PointJob", "ProcessExecutor", "SubmititExecutor", "SubmititOptions",
    "SweepPlan", "SweepResult", "SweepSpec", "Task", "check_existing", "expand", "import_submitit", "is_sweep_spec",
    "parse_grid_option", "parse_slurm_options", "plan_sweep", "point_ids", "point_labels", "read_sweep", "run_state",
    "run_sweep", "safe_name", "split_values", "status_rows", "status_table", "sweep_lock", "train_command", "value_text",
    "write_sweep",
]  # fmt: skip


def __getattr__(name: str):
    # PointJob needs submitit, so lnsgd.sweep.slurm defines it on first use (see there).
    if name == "PointJob":
        from lnsgd.sweep import slurm

        return slurm.PointJob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
