"""``lnsgd sweep`` and ``lnsgd sweep-status``: thin commands over lnsgd.sweep.

Everything read from the environment (visible GPUs, CPU count, the Python interpreter)
is read here and passed down, so lnsgd.sweep stays free of globals.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lnsgd.cli.app import app, console, err_console, fail, friendly

SUBMITIT_PANEL = "submitit executor (--executor submitit)"


@app.command("sweep")
@friendly
def sweep(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="recipe YAML; or a sweep spec (a YAML file with a grid:, e.g. recipes/sweeps/fig3-cifar10.sweep); "
            "or a sweep folder to continue it as it was built",
            show_default=False,
        ),
    ],
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(help="key=value overrides applied to every run, e.g. train.epochs=50", show_default=False),
    ] = None,
    grid: Annotated[
        Optional[list[str]],
        typer.Option(
            "--grid", "-g", help="one grid axis, key=v1,v2,... (repeatable): --grid optim.lr=0.5,1,2 --grid seed=0,1,2"
        ),
    ] = None,
    zip_: Annotated[
        bool, typer.Option("--zip", help="pair the grid lists element by element (equal lengths) instead of crossing them")
    ] = False,
    name: Annotated[
        Optional[str],
        typer.Option(
            "--name",
            help="sweep name; runs go to <log.dir>/<name>/<point> (default: <recipe name>-<grid keys>, e.g. quickstart-lr-seed)",
        ),
    ] = None,
    executor: Annotated[
        str, typer.Option("--executor", "-e", help="process: child processes on this machine; submitit: a job array")
    ] = "process",
    jobs: Annotated[
        Optional[int],
        typer.Option(
            "--jobs", "-j", min=1, help="process: runs at once (default: one per visible GPU, 1 on CPU)", show_default=False
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="start over in a sweep folder built from another recipe or grid (keeps identical runs)"),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the points and what would run; start nothing")] = False,
    cluster: Annotated[
        Optional[str],
        typer.Option(
            "--cluster",
            help="slurm, local or debug (submitit's backends); default: slurm if available, else local",
            rich_help_panel=SUBMITIT_PANEL,
        ),
    ] = None,  # fmt: skip
    partition: Annotated[
        Optional[str], typer.Option("--partition", help="SLURM partition", rich_help_panel=SUBMITIT_PANEL)
    ] = None,
    gpus_per_job: Annotated[
        Optional[int],
        typer.Option(
            "--gpus-per-job",
            min=0,
            help="GPUs per run (default: 1 on a Slurm partition whose nodes have GPUs, per sinfo; else 0)",
            rich_help_panel=SUBMITIT_PANEL,
        ),
    ] = None,
    cpus_per_job: Annotated[
        Optional[int],
        typer.Option(
            "--cpus-per-job",
            min=1,
            help="SLURM: CPUs per run (default: 4, or all of a node's if it has fewer)",
            rich_help_panel=SUBMITIT_PANEL,
            show_default=False,
        ),
    ] = None,
    max_requeues: Annotated[
        int,
        typer.Option(
            "--max-requeues",
            min=0,
            help="time-limit requeues per job before it is given up (requeues by preemption or scontrol are not counted)",
            rich_help_panel=SUBMITIT_PANEL,
        ),
    ] = 3,
    timeout_min: Annotated[
        int,
        typer.Option(
            "--timeout-min",
            min=1,
            help="time limit per job in minutes; on timeout a run checkpoints and requeues",
            rich_help_panel=SUBMITIT_PANEL,
        ),
    ] = 24 * 60,  # fmt: skip
    mem_gb: Annotated[
        Optional[float], typer.Option("--mem-gb", help="memory per job (GB)", rich_help_panel=SUBMITIT_PANEL)
    ] = None,
    array_parallelism: Annotated[
        Optional[int],
        typer.Option(
            "--array-parallelism", min=1, help="SLURM: jobs of the array running at once", rich_help_panel=SUBMITIT_PANEL
        ),
    ] = None,
    slurm: Annotated[
        Optional[list[str]],
        typer.Option(
            "--slurm",
            help="extra SLURM setting key=value (repeatable), e.g. --slurm qos=high --slurm constraint=a100",
            rich_help_panel=SUBMITIT_PANEL,
        ),
    ] = None,  # fmt: skip
) -> None:
    """Run a grid of trainings from one recipe: one run folder per point, resumable, locally or on a cluster.

    Rerunning the same command skips finished runs, resumes interrupted ones from their last
    checkpoint and starts the rest. Progress and results are in <log.dir>/<name>/sweep.json.

    Example, into runs/quickstart-lr-seed/: lnsgd sweep recipes/quickstart.yaml --grid optim.lr=0.05,0.1,0.2 --grid seed=0,1,2 --jobs 2
    """
    from lnsgd.errors import RunInterrupted
    from lnsgd.sweep import ProcessExecutor, SubmititExecutor, SubmititOptions, parse_slurm_options, plan_sweep, run_sweep

    if executor not in ("process", "submitit"):
        raise fail(f"--executor {executor!r}: expected process or submitit")
    plan = plan_sweep(recipe, grid or [], overrides or [], name=name, zip_=zip_)
    if dry_run:
        _print_plan(plan, console)
        return
    if executor == "submitit":
        options = SubmititOptions(cluster=cluster, partition=partition, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                                  timeout_min=timeout_min, max_requeues=max_requeues, mem_gb=mem_gb,
                                  array_parallelism=array_parallelism, slurm=parse_slurm_options(slurm or []))  # fmt: skip
        runner = SubmititExecutor(options)
    else:
        gpus = _visible_gpus()
        n = jobs or max(1, len(gpus))
        env = dict(os.environ)
        if not gpus and n > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))  # share the cores, don't oversubscribe them
        runner = ProcessExecutor(jobs=n, gpus=gpus, env=env, python=sys.executable)
    err_console.print(f"sweep {plan.name}: {len(plan.points)} runs in {plan.dir}", highlight=False)
    again = _command_line(recipe, overrides, grid, zip_, name, executor, jobs, cluster, partition, gpus_per_job, timeout_min,
                          mem_gb, array_parallelism, slurm, cpus_per_job, max_requeues)  # fmt: skip
    try:
        result = run_sweep(plan, runner, force=force, event=_printer(err_console))
    except RunInterrupted as e:
        raise fail(f"{e}; continue with: {again}", 130) from None
    from lnsgd.sweep import status_rows, status_table

    console.print(status_table(*status_rows(plan.dir)))
    failed = [pid for pid, s in result.statuses.items() if s == "failed"]
    if failed:
        raise fail(
            f"{len(failed)} of {len(result.statuses)} runs failed "
            f"({', '.join(failed[:4])}{', ...' if len(failed) > 4 else ''}); "
            f"see {plan.dir / 'sweep.json'} and each run's train.log, fix, then rerun: {again}"
        )


@app.command("sweep-status")
@friendly
def sweep_status(
    sweep_dir: Annotated[Path, typer.Argument(help="a sweep folder, <log.dir>/<sweep name>", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON instead of a table")] = False,
) -> None:
    """Points of a sweep: status, epoch, last train/test accuracy (and sharpness when measured).

    Example (after the lnsgd sweep example): lnsgd sweep-status runs/quickstart-lr-seed
    """
    import json

    from lnsgd.sweep import status_rows, status_table

    data, rows = status_rows(sweep_dir)
    if as_json:
        console.print_json(json.dumps(rows, default=str))
    else:
        console.print(status_table(data, rows))


def _visible_gpus() -> list[str]:
    """GPU ids to pin runs to (CUDA_VISIBLE_DEVICES values), or [] with fewer than two GPUs."""
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n)]
    return ids[:n]


def _printer(err_console):
    def event(kind: str, pid: str, info: dict) -> None:
        if kind == "started":
            where = f", GPU {info['gpu']}" if info.get("gpu") is not None else ""
            where += f", job {info['job_id']}" if info.get("job_id") else ""
            err_console.print(f"  start  {pid} ({'resume' if info.get('resume') else 'fresh'}{where})", highlight=False)
        elif kind == "finished":
            took = f" in {info['seconds']:.0f}s" if info.get("seconds") is not None else ""
            err = f": {info['error']}" if info.get("error") else ""
            color = {"done": "green", "failed": "red"}.get(info["status"], "yellow")
            err_console.print(f"  [{color}]{info['status']:<6}[/] {pid}{took}{err}", highlight=False, soft_wrap=True)
        elif kind == "requeued":
            times = f", {info['requeues']} times" if info.get("requeues", 1) > 1 else ""
            err_console.print(f"  [cyan]requeued[/] {pid} (job {info['job_id']}, now {info['state'].lower()}{times}; "
                              "it resumes from last.pt)", highlight=False)  # fmt: skip
        elif kind == "skipped":
            err_console.print(f"  skip   {pid} (done)", highlight=False)
        elif kind == "note":
            err_console.print(f"  note   {info['text']}", highlight=False, soft_wrap=True)

    return event


def _print_plan(plan, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    from lnsgd.sweep import run_state

    table = Table("point", "would", "overrides", title=escape(f"sweep {plan.name}: {len(plan.points)} runs in {plan.dir}"))
    for p in plan.points:
        state = run_state(p.dir, p.recipe.train.epochs)
        would = {"done": "skip (done)", "resumable": "resume", "fresh": "start"}[state]
        ckpt = p.recipe.init.checkpoint
        if state == "fresh" and ckpt is not None and not Path(ckpt).exists():
            would = "start: init.checkpoint missing"
        table.add_row(escape(p.id), would, escape(" ".join(p.grid_overrides)))
    console.print(table)


def _command_line(recipe, overrides, grid, zip_, name, executor, jobs, cluster, partition, gpus_per_job, timeout_min, mem_gb,
                  array_parallelism, slurm, cpus_per_job=None, max_requeues=3) -> str:  # fmt: skip
    """The command that continues this sweep (the same arguments)."""
    args = ["lnsgd", "sweep", str(recipe), *(overrides or [])]
    for g in grid or []:
        args += ["--grid", g]
    args += ["--zip"] if zip_ else []
    args += ["--name", name] if name else []
    if executor != "process":
        args += ["--executor", executor]
    options = (("--jobs", jobs), ("--cluster", cluster), ("--partition", partition), ("--gpus-per-job", gpus_per_job),
               ("--cpus-per-job", cpus_per_job), ("--mem-gb", mem_gb), ("--array-parallelism", array_parallelism))  # fmt: skip
    for flag, value in options:
        if value is not None:
            args += [flag, str(value)]
    if executor == "submitit" and timeout_min != 24 * 60:
        args += ["--timeout-min", str(timeout_min)]
    if executor == "submitit" and max_requeues != 3:
        args += ["--max-requeues", str(max_requeues)]
    for s in slurm or []:
        args += ["--slurm", s]
    return shlex.join(args)
