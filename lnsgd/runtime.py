"""What every command needs from its process: the device, numeric flags, seeds, stop signals, run folders.

One implementation of each, used by training, the inits, the theory lab, the demo and
sweeps alike:

- ``resolve_device`` and ``backend_settings`` (the recipe's TF32 / denormal flags, put
  back as they were when the block ends);
- ``stream_seed``: an independent, reproducible seed per random stream of a run;
- ``SignalTrap``: handle some signals in the main thread while a block runs, then
  restore the previous handlers; ``StopFlag`` is the one training loops use;
- ``claim_folder``: create an output folder, refusing to overwrite an existing one
  unless asked; ``run_dir_for``; ``environment_info`` for summaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from lnsgd import __version__
from lnsgd.errors import LnsgdError
from lnsgd.recipe import Recipe

# --------------------------------------------------------------------------- device and numeric flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LnsgdError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


@contextlib.contextmanager
def backend_settings(recipe: Recipe, device: torch.device) -> Iterator[None]:
    """The process-wide numeric settings the recipe asks for, while the block runs.

    On the CPU denormals are flushed (near zero loss they made plain SGD ~100x slower in
    a prototype); TF32 matmuls and convolutions are on only for ``precision: tf32``.
    """
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    tf32 = recipe.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        if flushed:
            torch.set_flush_denormal(False)


def stream_seed(seed: int, stream: str) -> int:
    """Independent, reproducible seeds for each random stream of a run."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- stop signals


class SignalTrap:
    """Route ``signals`` to ``handler(signum)`` while the block runs, then restore the old handlers.

    Only the main thread may install handlers; elsewhere the trap does nothing.
    """

    def __init__(self, signals: Iterable[int], handler: Callable[[int], None]):
        self.signals = tuple(signals)
        self.handler = handler
        self._old: dict = {}

    def __enter__(self) -> SignalTrap:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.handler(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def previous(self, sig: int):
        """The handler that was installed for ``sig`` before this trap (None if not trapped)."""
        return self._old.get(sig)


class StopFlag(SignalTrap):
    """Set by SIGINT/SIGTERM; the loop finishes the current step, checkpoints and stops.

    A second Ctrl-C (SIGINT) while stopping raises KeyboardInterrupt at once: a person
    asked twice. Repeated SIGTERMs (a cluster's requeue, preemption, a scheduler that
    signals every process) change nothing: the checkpoint is written once, untorn.
    """

    def __init__(self):
        super().__init__((signal.SIGINT, signal.SIGTERM), self._stop)
        self.signal: int | None = None

    def _stop(self, signum: int) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT and self.signal == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signum

    def request(self, signum: int) -> None:
        """Ask the loop to stop as if ``signum`` had arrived (once; later requests are ignored)."""
        if self.signal is None:
            self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "signal"


# --------------------------------------------------------------------------- run folders


def refuse_existing(path: Path, *, what: str = "run folder", resume: bool = False, force: bool = False,
                    other: str = "choose another name=<...>") -> bool:  # fmt: skip
    """Refuse an existing, non-empty ``path`` unless ``resume`` or ``force``; touches nothing.
    Returns whether it exists (commands call this before expensive checks, then ``claim_folder``)."""
    exists = path.exists() and any(path.iterdir())
    if exists and not resume and not force:
        again = "pass --resume to continue it, --force to overwrite it" if what == "run folder" else "pass --force to overwrite it"
        raise LnsgdError(f"{what} {path} already exists; {again}, or {other}")
    return exists


def claim_folder(path: Path, *, what: str = "run folder", resume: bool = False, force: bool = False,
                 other: str = "choose another name=<...>", make: Iterable[str] = (),
                 writable: str = "set log.dir to a writable folder") -> None:  # fmt: skip
    """Create ``path`` for a command's output, refusing to overwrite an existing one.

    An existing, non-empty folder is refused unless ``resume`` (kept as it is; it must
    hold ``checkpoints/last.pt``) or ``force`` (removed first). ``make`` names sub-folders
    to create. A folder that cannot be written is one clear error.
    """
    exists = refuse_existing(path, what=what, resume=resume, force=force, other=other)
    if exists:
        refuse_if_in_use(path)
    if resume and not (path / "checkpoints" / "last.pt").exists():
        raise LnsgdError(f"nothing to resume in {path} (no checkpoints/last.pt); run without --resume")
    try:
        if exists and force and not resume:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        for sub in make:
            (path / sub).mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise LnsgdError(f"cannot write {what} {path} ({e.strerror or e}); {writable}") from None


LOCK_FILE = ".lnsgd.lock"


class RunLock:
    """One writer per run folder, for the run's lifetime: an exclusive ``flock`` on
    ``<run>/.lnsgd.lock``, which names its holder (pid, host, Slurm job id, start time).

    The kernel releases the lock when its process ends however it ends (SIGKILL, OOM,
    node reboot), so a lock file left by a dead writer is never mistaken for a live one.
    A second writer — ``--resume`` or ``--force`` while a run is training there, a
    sweep's second job on the same point — is refused with one line naming the holder.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LnsgdError(f"run folder {self.path.parent} is in use by {holder(self.path)}; wait for that run to end "
                             "(or stop it), then try again") from None  # fmt: skip
        info = {"pid": os.getpid(), "host": platform.node(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays, naming the last holder
            self._fd = None


def holder(lock_path: Path) -> str:
    """Who holds a run folder's lock, in words, from what the holder wrote."""
    try:
        info = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{job} (since {info.get('started', '?')})"


def refuse_if_in_use(path: Path) -> None:
    """Refuse to touch a run folder another live process is writing (before --force removes it)."""
    lock = path / LOCK_FILE
    if not lock.exists():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LnsgdError(f"run folder {path} is in use by {holder(lock)}; wait for that run to end (or stop it), "
                         "then try again") from None  # fmt: skip
    finally:
        os.close(fd)


def run_dir_for(recipe: Recipe, out: Path | None = None) -> Path:
    return Path(out) if out is not None else Path(recipe.log.dir) / recipe.name


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: torch.device) -> dict:
    info = {"lnsgd": __version__, "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["git_commit"] = _git_commit()
    return info
