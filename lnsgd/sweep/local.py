"""The ``process`` executor: the points as `lnsgd train` child processes on this machine.

Up to ``jobs`` runs at once, each ``python -m lnsgd train RECIPE overrides... --out
<point> --quiet [--resume]`` in its own session, with stdout+stderr in
``<point>/train.log``, pinned round robin to one GPU when several are visible.
SIGINT/SIGTERM/SIGHUP to the sweep stops launching and forwards SIGTERM once to every
child, which checkpoints and exits 130; the sweep then raises ``RunInterrupted``: rerunning
the same command continues. Children get their own session so a terminal's Ctrl-C reaches
them only through the sweep, once (a second signal would make them give up at once).
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from lnsgd.errors import LnsgdError, RunInterrupted
from lnsgd.sweep.plan import Point, SweepPlan, run_state, utc_now
from lnsgd.sweep.run import Event, SignalCounter, Task

LOG_FILE = "train.log"  # a point's stdout and stderr, in its run folder


class ProcessExecutor:
    """Runs points as child processes, up to ``jobs`` at once, each pinned to one GPU of ``gpus``."""

    def __init__(self, jobs: int = 1, gpus: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 python: str = "python", poll_s: float = 0.1):  # fmt: skip
        if jobs < 1:
            raise LnsgdError(f"--jobs {jobs}: expected at least 1 run at a time")
        self.jobs, self.gpus, self.env, self.python, self.poll_s = jobs, list(gpus), dict(env or {}), python, poll_s

    def run(self, plan: SweepPlan, tasks: list[Task], update: Callable[[str, dict], None], event: Event) -> None:
        queue = collections.deque(tasks)
        running: dict[str, _Child] = {}
        signals = SignalCounter()
        forwarded = 0
        try:
            with signals:
                while queue or running:
                    if signals.count > forwarded:  # forward each stop request once (a second makes children give up)
                        for child in running.values():
                            with contextlib.suppress(ProcessLookupError):
                                child.proc.send_signal(signal.SIGTERM)
                        forwarded = signals.count
                    while not signals.count and queue and len(running) < self.jobs:
                        task = queue.popleft()
                        gpu = self._pick_gpu(running)
                        running[task.point.id] = child = self._launch(task, gpu)
                        update(task.point.id, {"status": "running", "started": utc_now(), "gpu": gpu, "resumed": task.resume,
                                               "error": None, "returncode": None})  # fmt: skip
                        event("started", task.point.id, {"resume": task.resume, "gpu": gpu, "pid": child.proc.pid})
                    for pid, child in list(running.items()):
                        rc = child.proc.poll()
                        if rc is None:
                            continue
                        child.pump.join(timeout=10)
                        del running[pid]
                        status, error = self._outcome(child, rc, stopping=bool(signals.count))
                        update(pid, {"status": status, "returncode": rc, "error": error, "finished": utc_now()})
                        event("finished", pid, {"status": status, "error": error, "seconds": time.time() - child.started})
                    if signals.count and not running:
                        break
                    time.sleep(self.poll_s)
        finally:
            for child in running.values():  # only on an unexpected error in the sweep itself
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
            for child in running.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=60)
        if signals.count:
            raise RunInterrupted(f"sweep stopped by {signals.name}")

    def _pick_gpu(self, running: Mapping[str, _Child]) -> str | None:
        """The least busy GPU, round robin among equals; None on CPU or with a single GPU."""
        if len(self.gpus) < 2:
            return None
        load = collections.Counter(c.gpu for c in running.values())
        return min(self.gpus, key=lambda g: (load[g], self.gpus.index(g)))

    def _launch(self, task: Task, gpu: str | None) -> _Child:
        point = task.point
        if not task.resume and point.dir.exists():
            shutil.rmtree(point.dir)  # a start that never checkpointed: nothing worth keeping
        env = dict(self.env, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        cmd = [self.python, "-m", "lnsgd", *task.command]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        header = f"# {utc_now()} lnsgd sweep runs: {shlex.join(['lnsgd', *task.command])}\n"
        return _Child(point, proc, gpu, header, ready_immediately=task.resume)

    @staticmethod
    def _outcome(child: _Child, rc: int, stopping: bool) -> tuple[str, str | None]:
        if rc == 0 and run_state(child.point.dir, child.point.recipe.train.epochs) == "done":
            return "done", None
        last = child.last_line()
        if rc == 130 or (stopping and rc < 0):
            return "interrupted", None  # checkpointed; its message only repeats how to resume
        if rc < 0:
            return "failed", f"killed by {signal.Signals(-rc).name}" + (f"; {last}" if last else "")
        return "failed", last or f"exit code {rc}"


class _Child:
    """A running point: its process, and a thread copying its output into <point>/train.log.

    A fresh run's folder must not exist or be empty when `lnsgd train` prepares it, so the log
    is held in memory until the run has written its recipe.yaml, and written from then on.
    """

    def __init__(self, point: Point, proc: subprocess.Popen, gpu: str | None, header: str, ready_immediately: bool):
        self.point, self.proc, self.gpu, self.started = point, proc, gpu, time.time()
        self.tail = collections.deque(maxlen=64)
        self._partial = b""
        self._ready = ready_immediately
        self._header = header.encode()
        self.pump = threading.Thread(target=self._copy, name=f"log {point.id}", daemon=True)
        self.pump.start()

    def _copy(self) -> None:
        fd = self.proc.stdout.fileno()
        pending = bytearray(self._header)
        log = None
        try:
            while True:
                readable, _, _ = select.select([fd], [], [], 0.5)
                chunk = os.read(fd, 1 << 16) if readable else None
                if chunk:
                    self._remember(chunk)
                if log is None and (self._ready or chunk == b"" or (self.point.dir / "recipe.yaml").exists()):
                    self.point.dir.mkdir(parents=True, exist_ok=True)
                    log = open(self.point.dir / LOG_FILE, "ab")
                    log.write(pending)
                    pending.clear()
                if chunk == b"":
                    break
                if chunk:
                    if log is None:
                        pending += chunk
                    else:
                        log.write(chunk)
                        log.flush()
        finally:
            if log is not None:
                log.close()
            self.proc.stdout.close()

    def _remember(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[-4096:]
        self.tail.extend(ln for ln in lines if ln.strip())

    def last_line(self) -> str | None:
        lines = list(self.tail) + ([self._partial] if self._partial.strip() else [])
        if not lines:
            return None
        text = lines[-1].decode("utf-8", "replace").strip()
        return text.removeprefix("error:").strip()[:500]
