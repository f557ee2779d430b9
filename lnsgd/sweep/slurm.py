"""The ``submitit`` executor: the points as one submitit job array (Slurm, or submitit's local backend).

One ``executor.batch()`` of ``PointJob``s, a ``submitit.helpers.Checkpointable`` that
trains one point in-process. Logs go to ``<log.dir>/<sweep>/submitit/``; submitit is
imported only when this executor is used.

*Time limit and preemption.* Slurm sends SIGUSR2 only as the time-limit warning that
submitit configures (``--signal=USR2@<signal_delay_s>``); submitit's local backend sends
it before its timeout too, and ``job._interrupt()`` sends it to simulate a preemption.
Preemption and requeueing send SIGTERM (then SIGKILL after the grace time): while training,
the loop's own SIGTERM handler writes ``last.pt`` after the current step and stops, and
the requeued job, or the sweep's rerun, resumes from it. On SIGUSR2 submitit's handler
calls ``checkpoint()`` and requeues. ``checkpoint()`` cannot reach into the training loop,
and waiting for the next ``train.checkpoint_every`` boundary could lose hours of a
ResNet18 run, so ``PointJob`` puts its own SIGUSR2 handler in front of submitit's for the
duration of training: it sets the loop's stop flag (the same one SIGTERM sets), the loop
writes ``last.pt`` after the current step and raises ``RunInterrupted``, and only then is
submitit's handler called, which calls ``checkpoint()`` (a ``DelayedSubmission`` of the
same ``PointJob``) and requeues. The requeued job finds ``last.pt`` and resumes exactly.
If the signal arrives outside the loop (data loading, writing final.pt) submitit's
handler runs at once; the last ``last.pt`` is still a consistent state.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lnsgd.errors import LnsgdError, RunInterrupted
from lnsgd.recipe import recipe_from_dict, recipe_to_dict
from lnsgd.sweep.grid import yaml_value
from lnsgd.sweep.plan import SUBMITIT_DIR, SweepPlan, run_state, utc_now
from lnsgd.sweep.run import Event, SignalCounter, Task


def import_submitit():
    """The submitit module, or an error that says how to install it."""
    try:
        import submitit
    except ImportError:
        raise LnsgdError(
            "--executor submitit needs the submitit package: pip install submitit (or pip install 'lnsgd[slurm]')"
        ) from None
    return submitit


def __getattr__(name: str):
    # PointJob subclasses submitit's Checkpointable, so it is defined on first use: importing
    # lnsgd.sweep never needs submitit. Unpickling a job looks the class up here, by name.
    if name == "PointJob":
        cls = _define_point_job()
        globals()["PointJob"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_point_job():
    submitit = import_submitit()

    class PointJob(submitit.helpers.Checkpointable):
        """Trains one sweep point in-process; requeued with the same arguments on preemption/timeout."""

        def __init__(self, recipe: dict, run_dir: str):
            self.recipe = recipe  # a plain mapping: pickles without lnsgd classes
            self.run_dir = run_dir

        def __call__(self) -> dict:
            from lnsgd.sharpness import training_hook
            from lnsgd.train import train

            recipe = recipe_from_dict(self.recipe)
            run_dir = Path(self.run_dir)
            state = run_state(run_dir, recipe.train.epochs)
            if state == "done":  # e.g. requeued after it finished
                return json.loads((run_dir / "summary.json").read_text())
            resume = state == "resumable"
            with _checkpoint_on_preemption() as preempted:
                try:
                    return train(recipe, run_dir, resume=resume, force=not resume, sharpness_hook=training_hook(recipe))
                except RunInterrupted:
                    if preempted.pending is None:
                        raise  # SIGTERM/SIGINT (scancel, Ctrl-C, preemption): last.pt is written, the run interrupted
                    preempted.requeue()  # submitit: checkpoint() below, requeue, exit
                    raise

        def checkpoint(self, *args, **kwargs):
            # The training loop has already written last.pt (see _checkpoint_on_preemption); the
            # requeued job resumes from it. Returning self resubmits the same point.
            return submitit.helpers.DelayedSubmission(self)

    PointJob.__module__ = __name__
    PointJob.__qualname__ = "PointJob"
    return PointJob


class _checkpoint_on_preemption:
    """Route submitit's time-limit/preemption signal (SIGUSR2) through the training loop's stop flag.

    While training, SIGTERM/SIGINT belong to the loop's StopFlag: on SIGUSR2 we call that
    handler, so the loop checkpoints after the current step and raises RunInterrupted; the
    caller then calls ``requeue()``, which runs submitit's own handler (checkpoint() and
    requeue). Outside the loop (loading data, writing final.pt), submitit's handler runs at once.
    The handler is installed by a ``lnsgd.runtime.SignalTrap`` (main thread only), which
    restores submitit's when the block ends.
    """

    def __init__(self):
        self.pending: int | None = None  # the signal, once it came
        self.sig = getattr(signal, "SIGUSR2", None)
        self._trap = None

    def __enter__(self) -> _checkpoint_on_preemption:
        from lnsgd.runtime import SignalTrap  # here: importing lnsgd.sweep stays free of torch

        self._trap = SignalTrap(() if self.sig is None else (self.sig,), self._handle)
        self._trap.__enter__()
        return self

    @property
    def submitit_handler(self):
        """The handler the trap replaced (submitit's, in a job); None outside the block or thread."""
        return self._trap.previous(self.sig) if self._trap is not None and self.sig is not None else None

    def _handle(self, signum: int) -> None:
        from lnsgd.runtime import StopFlag

        loop = signal.getsignal(signal.SIGTERM)
        if self.pending is None and isinstance(getattr(loop, "__self__", None), StopFlag):
            self.pending = signum
            loop.__self__.request(signal.SIGTERM)  # the loop checkpoints after this step, then raises RunInterrupted
        elif self.pending is None:
            self.pending = signum
            self.requeue()

    def requeue(self) -> None:
        handler = self.submitit_handler
        if callable(handler) and self.pending is not None:
            handler(self.pending, None)  # signal handlers take (signum, frame); submitit's ignores the frame

    def __exit__(self, *exc) -> None:
        self._trap.__exit__(*exc)


@dataclass
class SubmititOptions:
    """How the job array is submitted: the ``--cluster``, ``--partition``, ... options of `lnsgd sweep`."""

    cluster: str | None = None  # slurm, local, debug; None: submitit's detection
    partition: str | None = None
    gpus_per_job: int | None = None  # None: 1 on slurm, 0 otherwise
    timeout_min: int = 24 * 60
    mem_gb: float | None = None
    array_parallelism: int | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # --slurm key=value
    poll_s: float = 1.0


def parse_slurm_options(items: Sequence[str]) -> dict[str, Any]:
    """``--slurm key=value`` options as {key: value}: dashes become underscores, values are YAML."""
    out = {}
    for text in items:
        key, sep, value = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise LnsgdError(f"malformed --slurm {text!r}: expected key=value, e.g. --slurm qos=high or --slurm constraint=a100")
        out[key] = yaml_value(value) if value.strip() else value
    return out


class SubmititExecutor:
    """Submits the points as one submitit job array and waits for them."""

    def __init__(self, options: SubmititOptions):
        self.options = options
        self.submitit = import_submitit()  # fail early, before the sweep folder is touched
        if options.cluster not in (None, "slurm", "local", "debug"):
            raise LnsgdError(f"--cluster {options.cluster!r}: expected slurm, local or debug")

    def make_executor(self, folder: Path, name: str = "lnsgd"):
        o = self.options
        try:
            ex = self.submitit.AutoExecutor(folder=folder, cluster=o.cluster)
        except Exception as e:  # noqa: BLE001 - e.g. slurm asked for where there is none
            raise LnsgdError(f"submitit cannot use cluster {o.cluster or 'auto'!r} here ({str(e).splitlines()[0]})") from None
        gpus = o.gpus_per_job if o.gpus_per_job is not None else (1 if ex.cluster == "slurm" else 0)
        params: dict[str, Any] = {"timeout_min": int(o.timeout_min), "gpus_per_node": int(gpus), "name": name}
        if o.mem_gb is not None:
            params["mem_gb"] = float(o.mem_gb)
        if o.partition:
            params["slurm_partition"] = o.partition
        if o.array_parallelism:
            params["slurm_array_parallelism"] = int(o.array_parallelism)
        probe = self.submitit.AutoExecutor(folder=folder, cluster="debug")  # only asked which names it takes
        extra = {}
        for k, v in o.slurm.items():
            if k != "additional_parameters" and _knows_parameter(probe, f"slurm_{k}"):
                params[f"slurm_{k}"] = v
            else:
                extra[k] = v  # written as `#SBATCH --k=v`
        if extra:
            params["slurm_additional_parameters"] = extra
        try:
            ex.update_parameters(**params)
        except (NameError, ValueError, AssertionError, TypeError) as e:
            raise LnsgdError(f"submitit refused the job parameters ({str(e).splitlines()[0]})") from None
        return ex

    def run(self, plan: SweepPlan, tasks: list[Task], update: Callable[[str, dict], None], event: Event) -> None:
        if not tasks:
            return
        PointJob = globals().get("PointJob") or __getattr__("PointJob")
        ex = self.make_executor(plan.dir / SUBMITIT_DIR, name=f"lnsgd-{plan.name}")
        with ex.batch():
            jobs = [ex.submit(PointJob(recipe_to_dict(t.point.recipe), str(t.point.dir))) for t in tasks]
        for t, job in zip(tasks, jobs, strict=True):
            update(t.point.id, {"status": "running", "job_id": str(job.job_id), "started": utc_now(), "error": None,
                                "returncode": None, "resumed": t.resume})  # fmt: skip
            event("started", t.point.id, {"resume": t.resume, "job_id": str(job.job_id)})
        waiting = {t.point.id: (t, job) for t, job in zip(tasks, jobs, strict=True)}
        signals = SignalCounter()
        with signals:
            if ex.cluster == "debug":  # debug jobs run in this process, one by one, when asked for their result
                for pid, (task, job) in list(waiting.items()):
                    if signals.count:
                        break
                    self._collect(pid, task, job, update, event)
                    del waiting[pid]
            while waiting and not signals.count:
                for pid, (task, job) in list(waiting.items()):
                    if job.done():
                        self._collect(pid, task, job, update, event)
                        del waiting[pid]
                if waiting:
                    time.sleep(self.options.poll_s)
            if signals.count and waiting:
                # Cancelling sends each job SIGINT (local) or SIGTERM (scancel): its training loop
                # checkpoints and stops. Wait a little for that, so a rerun finds the checkpoints.
                for _, job in waiting.values():
                    with contextlib.suppress(Exception):
                        job.cancel(check=False)
                deadline = time.time() + 60
                while time.time() < deadline and not all(_quiet_done(job) for _, job in waiting.values()):
                    time.sleep(0.5)
                for pid in waiting:
                    update(pid, {"status": "interrupted", "finished": utc_now()})
        if signals.count:
            raise RunInterrupted(f"sweep stopped by {signals.name}; its unfinished jobs were cancelled")

    @staticmethod
    def _collect(pid: str, task: Task, job, update, event) -> None:
        error = None
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - a failed job is reported, not raised
            error = _last_error_line(str(e))
        state = run_state(task.point.dir, task.point.recipe.train.epochs)
        if state == "done":
            status, error = "done", None
        elif error and "RunInterrupted" in error:
            status, error = "interrupted", None
        else:
            status = "failed"
            error = error or "the job ended without finishing the run"
        update(pid, {"status": status, "error": error, "finished": utc_now()})
        event("finished", pid, {"status": status, "error": error})


def _knows_parameter(probe, key: str) -> bool:
    """Whether submitit's public ``AutoExecutor.update_parameters`` takes the parameter name ``key``.

    It refuses a name that no executor has with a NameError, on any cluster and whatever the
    value. ``probe`` is a throwaway executor (the probe sets what it takes); values are checked
    by the real executor's update, which reports a bad one. Were a future submitit to raise
    another error for an unknown name, that update would report the name: none is dropped.
    """
    try:
        probe.update_parameters(**{key: 0})  # any value but None, which submitit reads as "not set"
    except NameError:
        return False
    except (ValueError, AssertionError, TypeError):
        pass  # a known name; 0 is just not a valid value for it
    return True


def _quiet_done(job) -> bool:
    try:
        return bool(job.done())
    except Exception:  # noqa: BLE001
        return True


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    exc = [ln for ln in lines if re.match(r"^[\w.]+(Error|Interrupted|Exception)\b.*:", ln)]
    line = exc[-1] if exc else (lines[-1] if lines else "unknown error")
    line = re.sub(r"^lnsgd\.errors\.(LnsgdError|DivergedError): ", "", line)
    return line[:500]
