"""Running a sweep: the points not yet done, handed to an executor, with progress in sweep.json.

``run_sweep`` is the same for every executor: it refuses a folder built from another
recipe or grid, takes the sweep's lock, skips the points that are done, resumes those with
``checkpoints/last.pt``, starts the rest, and records each point's status as the executor
reports it. The sweep is idempotent: after an interruption or a failure the same call
continues. An executor (``lnsgd.sweep.local.ProcessExecutor``,
``lnsgd.sweep.slurm.SubmititExecutor``) has one method, ``run(plan, tasks, update, event)``;
it counts stop signals with ``SignalCounter`` and raises ``RunInterrupted`` once its runs
have checkpointed.
"""

from __future__ import annotations

import collections
import contextlib
import shlex
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lnsgd.errors import LnsgdError, RunInterrupted
from lnsgd.sweep.plan import (
    STATUSES,
    SWEEP_FILE,
    Point,
    SweepPlan,
    check_existing,
    jsonable,
    read_sweep,
    run_state,
    sweep_lock,
    utc_now,
    write_sweep,
)

if TYPE_CHECKING:
    from lnsgd.sweep.local import ProcessExecutor
    from lnsgd.sweep.slurm import SubmititExecutor


@dataclass
class Task:
    """One point to run now: fresh or resumed."""

    point: Point
    resume: bool
    command: list[str]  # the equivalent `lnsgd train ...` (what the process executor runs)
    job_id: str | None = None  # the Slurm job sweep.json last recorded for it: watched, not resubmitted, while Slurm holds it


@dataclass
class SweepResult:
    """What ``run_sweep`` did: every point's status, the errors of failed ones, the points skipped."""

    name: str
    dir: Path
    statuses: dict[str, str]  # point id → status
    errors: dict[str, str]  # point id → last line of its error
    skipped: list[str]  # ids already done before this call

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)


Event = Callable[[str, str, dict], None]  # (kind, point id, info): started, finished, note


def train_command(recipe_path: Path, point: Point, resume: bool) -> list[str]:
    """The `lnsgd train` arguments that run one point (after the program name)."""
    cmd = ["train", str(recipe_path), *point.overrides, "--out", str(point.dir), "--quiet"]
    return cmd + (["--resume"] if resume else [])


class SignalCounter:
    """Counts SIGINT/SIGTERM/SIGHUP while the sweep runs (main thread only; elsewhere a no-op).

    The handlers are a ``lnsgd.runtime.SignalTrap``'s: in place while the block runs, the
    previous ones restored after. ``name`` is the last signal's name.
    """

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self):
        self.count = 0
        self.name = "signal"
        self._trap = None

    def __enter__(self) -> SignalCounter:
        from lnsgd.runtime import SignalTrap  # here: importing lnsgd.sweep stays free of torch

        self._trap = SignalTrap(self.SIGNALS, self._count)
        self._trap.__enter__()
        return self

    def _count(self, signum: int) -> None:
        self.count += 1
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        self._trap.__exit__(*exc)


def run_sweep(
    plan: SweepPlan,
    executor: ProcessExecutor | SubmititExecutor,
    *,
    force: bool = False,
    event: Event | None = None,
) -> SweepResult:
    """Run every point of ``plan`` that is not done yet; record progress in sweep.json.

    Raises ``RunInterrupted`` if stopped by a signal (runs are checkpointed; calling again
    continues). Failed runs do not stop the others: they are in the result.
    """
    event = event or (lambda kind, pid, info: None)
    for p in plan.points:  # before anything is written or launched
        ckpt = p.recipe.init.checkpoint
        if ckpt is not None and not Path(ckpt).exists() and run_state(p.dir, p.recipe.train.epochs) == "fresh":
            raise LnsgdError(
                f"sweep point {p.id}: init.checkpoint {ckpt} does not exist; build it first "
                "(lnsgd init-fullbatch / init-adversarial) or fix the path"
            )
    delete = check_existing(plan, force)
    with sweep_lock(plan.dir):
        for name in delete:
            target = plan.dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            event("note", name, {"text": f"deleted {target} (--force)"})
        old = {}
        if (plan.dir / SWEEP_FILE).exists():
            with contextlib.suppress(LnsgdError):
                old = read_sweep(plan.dir)
        old_points = {p.get("id"): p for p in old.get("points", [])}
        data = {**plan.record(), "created": old.get("created", utc_now()), "updated": utc_now(),
                "executor": type(executor).__name__.removesuffix("Executor").lower(), "points": []}  # fmt: skip
        tasks: list[Task] = []
        skipped: list[str] = []
        for p in plan.points:
            state = run_state(p.dir, p.recipe.train.epochs)
            prev = old_points.get(p.id, {})
            entry = {"id": p.id, "values": jsonable(p.values), "overrides": p.grid_overrides, "dir": p.id,
                     "epochs": p.recipe.train.epochs, "status": "done" if state == "done" else "pending",
                     "error": None}  # fmt: skip
            command = train_command(plan.recipe_path, p, resume=state == "resumable")
            entry["command"] = shlex.join(["lnsgd", *command])
            for k in ("started", "finished", "returncode", "job_id", "gpu", "requeues"):
                if k in prev and (state == "done" or k in ("started", "job_id", "requeues")):
                    entry[k] = prev[k]
            if state == "done":
                skipped.append(p.id)
            else:
                if prev.get("status") in ("failed", "interrupted"):
                    entry["previous"] = {"status": prev["status"], "error": prev.get("error")}
                tasks.append(Task(p, state == "resumable", command, job_id=prev.get("job_id")))
            data["points"].append(entry)
        by_id = {e["id"]: e for e in data["points"]}
        write_sweep(plan.dir, data)

        def update(pid: str, fields: dict) -> None:
            by_id[pid].update(jsonable(fields))
            data["updated"] = utc_now()
            write_sweep(plan.dir, data)

        for pid in skipped:
            event("skipped", pid, {})
        try:
            executor.run(plan, tasks, update, event)
        except RunInterrupted as e:
            counts = collections.Counter(e["status"] if e["status"] not in ("running", "requeued") else "interrupted"
                                         for e in data["points"])  # fmt: skip
            shown = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
            raise RunInterrupted(f"{e} ({shown}); runs were checkpointed") from None
        finally:
            for e in data["points"]:  # anything still marked running was not seen to finish
                if e["status"] == "running":
                    e["status"] = "interrupted"
            data["updated"] = utc_now()
            write_sweep(plan.dir, data)
    return SweepResult(plan.name, plan.dir, {e["id"]: e["status"] for e in data["points"]},
                       {e["id"]: e["error"] for e in data["points"] if e.get("error")}, skipped)  # fmt: skip
