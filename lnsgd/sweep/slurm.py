"""The ``submitit`` executor: the points as one submitit job array (Slurm, or submitit's local backend).

One ``executor.batch()`` of ``PointJob``s, a ``submitit.helpers.Checkpointable`` that
trains one point in-process. Logs go to ``<log.dir>/<sweep>/submitit/``; submitit is
imported only when this executor is used.

*Time limit and preemption.* Slurm sends SIGUSR2 only as the time-limit warning that
submitit configures (``--signal=USR2@<signal_delay_s>``); submitit's local backend sends
it before its timeout too, and ``job._interrupt()`` sends it to simulate a preemption.
Preemption, ``scontrol requeue`` and ``scancel`` send SIGTERM (then SIGKILL after the grace
time): while training, the loop's own SIGTERM handler writes ``last.pt`` after the current
step and stops; on Slurm the job then exits without a result (``STOPPED_EXIT``), so Slurm's
requeue runs it again and it resumes from ``last.pt``; the sweep reads what happened from
Slurm (``squeue``: state and restart count; ``sacct`` through submitit), shows "requeued",
and keeps watching. A rerun of the sweep watches a point's recorded job while Slurm still
holds it (``ACTIVE_STATES``) instead of submitting a second one. On SIGUSR2 submitit's handler
calls ``checkpoint()`` and requeues. ``checkpoint()`` cannot reach into the training loop,
and waiting for the next ``train.checkpoint_every`` boundary could lose hours of a
ResNet18 run, so ``PointJob`` puts its own SIGUSR2 handler in front of submitit's for the
duration of training: it sets the loop's stop flag (the same one SIGTERM sets), the loop
writes ``last.pt`` after the current step and raises ``RunInterrupted``, and only then is
submitit's handler called, which calls ``checkpoint()`` (a ``DelayedSubmission`` of the
same ``PointJob``) and requeues. The requeued job finds ``last.pt`` and resumes exactly.
If the signal arrives outside the loop (data loading, writing final.pt) submitit's
handler runs at once; the last ``last.pt`` is still a consistent state. A job stopped by
SIGTERM waits ``LATE_USR2_S`` for a USR2 before it exits: SIGTERM then USR2 (submitit's
``job._interrupt()``) requeues through submitit, whatever the timing of the two.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
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

        def __init__(self, recipe: dict, run_dir: str, requeue_on_stop: bool = False):
            self.recipe = recipe  # a plain mapping: pickles without lnsgd classes
            self.run_dir = run_dir
            # On Slurm, SIGTERM means requeue/preemption (or scancel): Slurm decides what comes
            # next, so the job leaves no result. Elsewhere (submitit's local backend) it is a stop.
            self.requeue_on_stop = requeue_on_stop

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
                except RunInterrupted as e:
                    if preempted.pending is not None:
                        preempted.requeue()  # submitit: checkpoint() below, requeue, exit
                        raise
                    if getattr(self, "requeue_on_stop", False):
                        # SIGTERM on Slurm: `scontrol requeue`, preemption, or scancel. last.pt is
                        # written; exit without a result (SystemExit passes submitit's `except
                        # Exception`), so Slurm's requeue runs this job again and it resumes, and
                        # the sweep reads the outcome from Slurm's state, not from an error result.
                        # A USR2 right behind the SIGTERM (submitit's simulated preemption) is
                        # waited for: it requeues the job through submitit instead.
                        print(f"lnsgd: {e}; exiting for Slurm to requeue or end the job", flush=True)
                        preempted.wait_for_signal(LATE_USR2_S)
                        raise SystemExit(STOPPED_EXIT) from None
                    raise  # SIGTERM/SIGINT elsewhere (cancel, Ctrl-C): last.pt is written, the run interrupted

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

    def wait_for_signal(self, seconds: float) -> None:
        """Sleep up to ``seconds`` or until SIGUSR2 came (its handler, ``_handle``, then requeues)."""
        deadline = time.monotonic() + seconds
        while self.pending is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def requeue(self) -> None:
        handler = self.submitit_handler
        if callable(handler) and self.pending is not None:
            handler(self.pending, None)  # signal handlers take (signum, frame); submitit's ignores the frame

    def __exit__(self, *exc) -> None:
        self._trap.__exit__(*exc)


STOPPED_EXIT = 143  # 128 + SIGTERM: a Slurm job that checkpointed on SIGTERM and left no result
# After a SIGTERM checkpoint, how long a job waits for a SIGUSR2 before it exits: submitit's
# simulated preemption (job._interrupt) sends SIGTERM then USR2, one scancel after the other;
# Slurm's own SIGKILL comes KillWait (30 s by default) after a SIGTERM.
LATE_USR2_S = 3.0
# Slurm states of a job that is not over: the sweep keeps watching it and never submits another.
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
                 "SUSPENDED", "RESIZING", "PREEMPTED", "READY", "SIGNALING", "STAGE_OUT")  # fmt: skip
STATE_POLL_S = 5.0  # how often the sweep asks sacct about its jobs (one call for the whole array)


@dataclass
class SubmititOptions:
    """How the job array is submitted: the ``--cluster``, ``--partition``, ... options of `lnsgd sweep`."""

    cluster: str | None = None  # slurm, local, debug; None: submitit's detection
    partition: str | None = None
    gpus_per_job: int | None = None  # None: 1 on a Slurm partition with GPUs (sinfo), else 0
    cpus_per_job: int | None = None  # None: on Slurm up to DEFAULT_CPUS, fewer if the nodes have fewer
    timeout_min: int = 24 * 60
    max_requeues: int = 3  # time-limit requeues per job (submitit's max_num_timeout)
    mem_gb: float | None = None
    array_parallelism: int | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # --slurm key=value
    poll_s: float = 1.0


DEFAULT_CPUS = 4


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


@dataclass
class SlurmNodes:
    """What ``sinfo`` says about a partition's nodes (the default one if none is named)."""

    cpus: int | None  # the most CPUs a node has
    gpus: bool  # whether any node has a GPU gres
    partitions: list[str]


def slurm_nodes(partition: str | None) -> SlurmNodes | None:
    """The nodes of ``partition`` from ``sinfo``, or None when sinfo is missing or fails."""
    import subprocess

    def sinfo(*args: str) -> list[str] | None:
        try:
            out = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.split("\n") if out.returncode == 0 else None

    names = sinfo("-o", "%R")
    if names is None:
        return None
    rows = sinfo(*(["-p", partition] if partition else []), "-o", "%c|%G") or []
    cpus = [int(m.group()) for r in rows if (m := re.match(r"\d+", r))]
    gres = [r.partition("|")[2] for r in rows if r.strip()]
    return SlurmNodes(max(cpus) if cpus else None, any("gpu" in g for g in gres),
                      sorted({n.strip() for n in names if n.strip()}))  # fmt: skip


def slurm_queue() -> dict[str, tuple[str, int]] | None:
    """This user's jobs that Slurm still holds, from ``squeue`` (no accounting needed): job id
    (``123_4`` for an array task) → (state, restart count); None when squeue fails."""
    import subprocess

    cmd = ["squeue", "-h", "-r", "--me", "-O", "JobArrayID:40,State:24,RestartCnt:8"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    out = {}
    for line in res.stdout.splitlines():
        words = line.split()
        if len(words) == 3 and words[2].isdigit():
            out[words[0]] = (words[1].upper(), int(words[2]))
    return out


def slurm_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """Slurm's state of each job id: ``squeue`` for the jobs it still holds, ``sacct`` for the
    ended ones (where accounting runs); None when neither answers (no Slurm here)."""
    import subprocess

    queue = slurm_queue()
    states = {j: queue[j][0] for j in job_ids if queue and j in queue}
    ended = [j for j in job_ids if j not in states]
    if ended:
        try:
            res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ended)],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            res = None
        for line in res.stdout.splitlines() if res is not None and res.returncode == 0 else ():
            jid, _, state = line.partition("|")
            if jid in ended and state:
                states[jid] = state.split()[0].upper()  # "CANCELLED by 0" → CANCELLED
    return states if (queue is not None or states) else None


class OncePerMessage:
    """Lets each distinct submitit warning through once: "Bypassing sacct error" on every poll
    (a cluster without accounting) is said once, and a new error still shows."""

    def __init__(self):
        self.seen: set[str] = set()

    def filter(self, record) -> bool:
        text = re.sub(r"^Call #\d+ - ", "", record.getMessage())
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


class SubmititExecutor:
    """Submits the points as one submitit job array and waits for them."""

    def __init__(self, options: SubmititOptions):
        self.options = options
        self.submitit = import_submitit()  # fail early, before the sweep folder is touched
        if options.cluster not in (None, "slurm", "local", "debug"):
            raise LnsgdError(f"--cluster {options.cluster!r}: expected slurm, local or debug")
        self.notes: list[str] = []  # what the defaults chose, said once the sweep starts
        self.nodes: SlurmNodes | None = None

    def make_executor(self, folder: Path, name: str = "lnsgd"):
        o = self.options
        requeues = {"slurm_max_num_timeout": int(o.max_requeues), "local_max_num_timeout": int(o.max_requeues)}
        try:
            ex = self.submitit.AutoExecutor(folder=folder, cluster=o.cluster, **requeues)
        except Exception as e:  # noqa: BLE001 - e.g. slurm asked for where there is none
            raise LnsgdError(f"submitit cannot use cluster {o.cluster or 'auto'!r} here ({str(e).splitlines()[0]})") from None
        gpus, cpus = o.gpus_per_job, o.cpus_per_job
        if ex.cluster == "slurm":
            self.nodes = slurm_nodes(o.partition)
            where = f"partition {o.partition}" if o.partition else "the default partition"
            if gpus is None:
                gpus = 1 if self.nodes is None or self.nodes.gpus else 0
                if gpus == 0:
                    self.notes.append(f"no GPUs on the nodes of {where} (sinfo): jobs run on CPUs (--gpus-per-job 0)")
            if cpus is None:
                node_cpus = self.nodes.cpus if self.nodes and self.nodes.cpus else DEFAULT_CPUS
                cpus = min(DEFAULT_CPUS, node_cpus)
        gpus = gpus if gpus is not None else 0
        params: dict[str, Any] = {"timeout_min": int(o.timeout_min), "gpus_per_node": int(gpus), "name": name}
        if cpus is not None:
            params["cpus_per_task"] = int(cpus)
        self.gpus = int(gpus)
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

    def submission_error(self, text: str) -> str:
        """sbatch's refusal as one line that names the option to change."""
        o = self.options
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        said = next((ln for ln in lines if re.search(r"error|unrecognized|invalid", ln, re.I)), lines[0] if lines else "")
        said = re.sub(r"^(sbatch: )?(error: )?", "", said)
        low = text.lower()
        unknown = re.search(r"unrecognized option '--([\w-]+)", text)
        if unknown:
            key = unknown.group(1).replace("-", "_")
            hint = (f"--slurm {key}=...: sbatch has no option --{unknown.group(1)} (see sbatch --help)" if key in o.slurm
                    else f"sbatch has no option --{unknown.group(1)}")  # fmt: skip
        elif "partition" in low:
            known = f"; partitions here: {', '.join(self.nodes.partitions)}" if self.nodes and self.nodes.partitions else ""
            hint = (f"--partition {o.partition}: no such partition{known}" if o.partition
                    else f"the default partition refused them: choose one with --partition{known}")  # fmt: skip
        elif "gres" in low or "gpu" in low.replace(str(o.partition).lower(), ""):
            hint = f"--gpus-per-job {self.gpus}: the nodes have no such GPUs; pass --gpus-per-job 0 on CPU-only nodes"
        elif "node configuration is not available" in low or "memory" in low:
            hint = "a job asks for more than a node has: lower --cpus-per-job, --mem-gb or --gpus-per-job"
        else:
            hint = "check --partition, --gpus-per-job, --cpus-per-job, --mem-gb and --slurm"
        return f"Slurm refused the jobs ({said or 'no reason given'}); {hint}. Nothing was submitted"

    def run(self, plan: SweepPlan, tasks: list[Task], update: Callable[[str, dict], None], event: Event) -> None:
        if not tasks:
            return
        PointJob = globals().get("PointJob") or __getattr__("PointJob")
        folder = plan.dir / SUBMITIT_DIR
        ex = self.make_executor(folder, name=f"lnsgd-{plan.name}")
        slurm = ex.cluster == "slurm"
        for text in self.notes:
            event("note", "", {"text": text})
        quiet = OncePerMessage()
        logger = logging.getLogger("submitit")
        logger.addFilter(quiet)
        try:
            adopted = self._adopt(tasks, folder, event) if slurm else {}
            jobs = dict(adopted)
            fresh = [t for t in tasks if t.point.id not in adopted]
            if fresh:
                jobs.update(self._submit(ex, fresh, folder, PointJob, requeue_on_stop=slurm))
            for t in tasks:
                job = jobs[t.point.id]
                if t.point.id not in adopted:
                    update(t.point.id, {"status": "running", "job_id": str(job.job_id), "started": utc_now(), "error": None,
                                        "returncode": None, "resumed": t.resume, "requeues": 0})  # fmt: skip
                    event("started", t.point.id, {"resume": t.resume, "job_id": str(job.job_id)})
                else:
                    update(t.point.id, {"status": "running", "error": None})
            self._watch(ex, tasks, jobs, update, event, slurm)
        finally:
            logger.removeFilter(quiet)

    def _submit(self, ex, tasks: list[Task], folder: Path, PointJob, requeue_on_stop: bool) -> dict:
        before = set(folder.rglob("*")) if folder.exists() else None
        try:  # submitit prints sbatch's refusal as well as raising it: it becomes our one line instead
            with contextlib.redirect_stderr(io.StringIO()), ex.batch():
                jobs = [ex.submit(PointJob(recipe_to_dict(t.point.recipe), str(t.point.dir), requeue_on_stop)) for t in tasks]
        except BaseException as e:
            _remove_new_files(folder, before)  # nothing of a failed submission stays behind
            refused = (self.submitit.core.utils.FailedJobError, self.submitit.core.utils.FailedSubmissionError, OSError)
            if isinstance(e, refused):  # sbatch's refusal, or sbatch missing; anything else is a bug and keeps its traceback
                raise LnsgdError(self.submission_error(str(e))) from None
            raise
        return {t.point.id: job for t, job in zip(tasks, jobs, strict=True)}

    def _adopt(self, tasks: list[Task], folder: Path, event: Event) -> dict:
        """The points whose recorded job Slurm still holds (pending, running, requeued): watched, not resubmitted."""
        recorded = {t.point.id: t.job_id for t in tasks if t.job_id}
        queue = (slurm_queue() or {}) if recorded else {}
        adopted = {}
        for pid, jid in recorded.items():
            state = queue.get(jid, ("", 0))[0]
            if state in ACTIVE_STATES:
                adopted[pid] = self.submitit.SlurmJob(folder=folder, job_id=jid)
                event("note", pid, {"text": f"{pid}: its job {jid} is still {state.lower()}; watching it, not submitting another"})
        return adopted

    def _watch(self, ex, tasks: list[Task], jobs: dict, update, event: Event, slurm: bool) -> None:
        waiting = {t.point.id: (t, jobs[t.point.id]) for t in tasks}
        queue_seen: dict[str, tuple[str, int]] = {}  # point id → (Slurm state, restarts) last seen
        next_state = 0.0
        signals = SignalCounter()
        with signals:
            if ex.cluster == "debug":  # debug jobs run in this process, one by one, when asked for their result
                for pid, (task, job) in list(waiting.items()):
                    if signals.count:
                        break
                    self._collect(pid, task, job, update, event)
                    del waiting[pid]
            while waiting and not signals.count:
                if slurm and time.time() >= next_state:  # one squeue call for all the jobs
                    next_state = time.time() + STATE_POLL_S
                    self._show_requeues(waiting, queue_seen, update, event)
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
    def _show_requeues(waiting: dict, seen: dict, update, event: Event) -> None:
        """Report each job Slurm requeued (its restart count went up) and each that runs again."""
        queue = slurm_queue()
        if queue is None:
            return
        for pid, (_, job) in waiting.items():
            if str(job.job_id) not in queue:
                continue  # not queued yet, or over: job.done() tells
            state, restarts = queue[str(job.job_id)]
            was_state, was_restarts = seen.get(pid, ("", restarts if pid not in seen else 0))
            seen[pid] = (state, restarts)
            if restarts > was_restarts or (state in ("REQUEUED", "REQUEUE_HOLD", "PREEMPTED") and state != was_state):
                update(pid, {"status": "requeued", "requeues": restarts})
                event("requeued", pid, {"job_id": str(job.job_id), "state": state, "requeues": restarts})
                if state == "RUNNING":
                    update(pid, {"status": "running"})
            elif state == "RUNNING" and was_state != "RUNNING" and restarts:
                update(pid, {"status": "running"})

    @staticmethod
    def _collect(pid: str, task: Task, job, update, event) -> None:
        error = None
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - a failed job is reported, not raised
            error = str(e)
            no_result = "has not produced any output" in error
            error = _last_error_line(error) if not no_result else error
            if no_result:  # ended outside Python's reach (scancel, a kill, a node failure): Slurm's state says how
                state = re.search(r"state: ([A-Z_]+)", error)
                error = f"the job ended {state.group(1) if state else 'without a result'}; see {job.paths.stdout}"
        state = run_state(task.point.dir, task.point.recipe.train.epochs)
        if state == "done":
            status, error = "done", None
        elif error and ("RunInterrupted" in error or " CANCELLED" in error):
            status, error = "interrupted", None
        else:
            status = "failed"
            error = error or "the job ended without finishing the run"
        update(pid, {"status": status, "error": error, "finished": utc_now()})
        event("finished", pid, {"status": status, "error": error})


def _remove_new_files(folder: Path, before: set[Path] | None) -> None:
    """Remove what a failed submission left in ``folder`` (pickles, sbatch files), and ``folder`` if it made it."""
    if not folder.exists():
        return
    for path in sorted(set(folder.rglob("*")) - (before or set()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()
    if before is None:
        with contextlib.suppress(OSError):
            folder.rmdir()


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
