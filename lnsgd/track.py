"""One metrics sink: metrics.jsonl always, wandb when enabled; and the progress display.

Loggers share one small interface (``log(row)``, ``close()``), so switching disk ↔
wandb is a recipe change. A tracking failure never kills a run: wandb errors are
reported once as a warning and wandb is switched off (or to offline mode).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lnsgd.errors import LnsgdError

if TYPE_CHECKING:  # keep this module light: lnsgd.report reads metrics through it
    from lnsgd.recipe import WandbConfig


def _clean(value: Any) -> Any:
    """JSON-safe value: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- writing files that must survive


class DiskFull(LnsgdError):
    """A write ran out of space; the file it was writing is as it was before."""


def _size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: Path, needed: int) -> DiskFull:
    """The one line for a write that ran out of space: the folder, what the file needs, what is free."""
    free = "an unknown amount"
    with contextlib.suppress(OSError):
        free = _size_text(shutil.disk_usage(path.parent).free)
    return DiskFull(f"no space left in {path.parent}: {path.name} needs {_size_text(needed)} and {free} is free; "
                    f"{path} is as it was before")  # fmt: skip


def temp_path(path: Path) -> Path:
    """This writer's temporary file for ``path``: host and pid in the name, so two writers never share one."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files for ``path`` left by killed writers on this host (and the plain ``.tmp`` of older lnsgd).

    A writer SIGKILLed mid-write leaves its temporary file behind; on a full disk that
    file holds the space the next write needs. Files of live processes, or of other hosts
    (a shared file system), are left alone.
    """
    host = socket.gethostname()
    for tmp in path.parent.glob(f"{path.name}.*tmp"):
        middle = tmp.name[len(path.name) + 1 : -len(".tmp")] if tmp.name != f"{path.name}.tmp" else None
        if middle is not None:
            tmp_host, _, pid = middle.rpartition(".")
            if tmp_host != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_atomically(path: Path, write: Callable[[BinaryIO], None], size: Callable[[], int]) -> None:
    """Write ``path`` with ``write(file)`` into this writer's temporary file, fsync, then ``os.replace``.

    A crash, a kill or a full disk leaves ``path`` as it was and no temporary file behind
    (a killed writer's file is removed by the next write); running out of space is a
    ``DiskFull`` naming the folder and the space needed (``size()`` bytes).
    """
    path = Path(path)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(exc):
            raise disk_full_error(path, size()) from None
        if isinstance(exc, OSError):
            raise LnsgdError(f"cannot write {path} ({exc.strerror or exc})") from None
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (``replace_atomically``)."""
    payload = data.encode() if isinstance(data, str) else data
    replace_atomically(path, lambda f: f.write(payload), lambda: len(payload))


class JsonlSink:
    """Appends one JSON object per line, synced so a crash loses at most the line being written.

    A line that cannot be written whole (a full disk) is cut off again, so the file
    never holds half a row, and the run stops with ``DiskFull``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(self, row: dict) -> None:
        line = (json.dumps({k: _clean(v) for k, v in row.items()}) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            view = memoryview(line)
            while view:  # os.write may write part of the line: a full disk writes what fits
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)
            if is_disk_full(exc):
                raise disk_full_error(self.path, len(line)) from None
            raise LnsgdError(f"cannot write {self.path} ({exc.strerror or exc})") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (none if it does not exist yet).

    The last line may be torn while a run is writing it (or after a crash), so an
    unparsable last line is dropped; an unparsable line anywhere else is an error
    naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LnsgdError(f"cannot read {path}: {exc.strerror or exc}") from None
    # Lines are decoded one by one, so a corrupt line (bytes that are not UTF-8) is named by its number.
    lines = [(number, line) for number, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if index == len(lines) - 1:
                break  # torn last line of a run in progress
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
            raise LnsgdError(
                f"{path}, line {number}: not valid JSON ({why}); every line but a torn last one must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise LnsgdError(f"{path}, line {number}: expected a JSON object of metrics, got {type(row).__name__}")
        rows.append(row)
    return rows


def truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` keeping only rows for which ``keep(row)`` holds (used when resuming)."""
    rows = [r for r in read_jsonl(path) if keep(r)]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


class WandbSink:
    """Mirrors rows to Weights & Biases; imported only when enabled."""

    def __init__(self, config: WandbConfig, run_dir: Path, name: str, recipe: dict, resume_id: str | None = None):
        self.run = None
        self.rows = 0  # rows wandb took, for the warning if it dies mid-run
        try:
            import wandb
        except ImportError:
            self._warn("wandb is not installed (pip install wandb); continuing without it")
            return
        self.wandb = wandb
        kwargs = dict(
            project=config.project, entity=config.entity, group=config.group, tags=list(config.tags),
            name=name, config=recipe, dir=str(run_dir), id=resume_id, resume="allow" if resume_id else None,
        )  # fmt: skip
        try:
            self.run = wandb.init(mode=config.mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - a tracker must never kill a run
            if config.mode == "online":
                self._warn(f"wandb online failed ({_first_line(e)}); continuing offline: `wandb sync {run_dir}/wandb` later")
                try:
                    self.run = wandb.init(mode="offline", **kwargs)
                except Exception as e2:  # noqa: BLE001
                    self._warn(f"wandb offline failed too ({_first_line(e2)}); continuing without wandb")
            else:
                self._warn(f"wandb failed ({_first_line(e)}); continuing without wandb")

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def _warn(self, msg: str) -> None:
        # Each failure warns once by construction: a failed init or log switches wandb off (or to offline).
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def log(self, row: dict) -> None:
        if self.run is None:
            return
        try:
            step = row.get("step")
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}, step=step)
            self.rows += 1
        except Exception as e:  # noqa: BLE001 - a tracker must never kill a run
            self._warn(f"wandb logging failed at step {row.get('step')} after {self.rows} rows ({_first_line(e)}); "
                       "continuing without wandb, metrics.jsonl keeps every row")  # fmt: skip
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:  # noqa: BLE001
                pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


class MetricsSink:
    """metrics.jsonl plus, optionally, wandb: the only place the loop sends metrics."""

    def __init__(self, run_dir: Path, wandb_config: WandbConfig | None = None, name: str = "", recipe: dict | None = None,
                 wandb_id: str | None = None):  # fmt: skip
        self.sinks: list = [JsonlSink(run_dir / "metrics.jsonl")]
        self.wandb: WandbSink | None = None
        if wandb_config is not None and wandb_config.mode != "disabled":
            self.wandb = WandbSink(wandb_config, run_dir, name, recipe or {}, wandb_id)
            self.sinks.append(self.wandb)

    def log(self, row: dict) -> None:
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class Progress:
    """What the loop reports to while it runs; the base class shows nothing (``--quiet``)."""

    def start(self, total_epochs: int, done_epochs: int, description: str, unit: str = "epochs") -> None: ...
    def advance(self, epoch: int, info: dict) -> None: ...
    def stop(self) -> None: ...


class RichProgress(Progress):
    """A rich progress bar over epochs, showing the last loss and accuracies."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.bar = None

    def start(self, total_epochs: int, done_epochs: int, description: str, unit: str = "epochs") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=False,
        )  # fmt: skip
        self.bar.start()
        self.task = self.bar.add_task(description, total=total_epochs, completed=done_epochs, info="")

    def advance(self, epoch: int, info: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(self.task, completed=epoch, info=_info_text(info))

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _info_text(info: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class LineProgress(Progress):
    """Plain lines every ``every_s`` seconds (and at the first and last epoch), for logs that are
    not a terminal (CI, Slurm job logs, ``> run.log``), where a redrawn bar is cut to its width."""

    def __init__(self, file, every_s: float = 30.0, clock=None):
        import time

        self.file, self.every_s, self.clock = file, every_s, clock or time.monotonic
        self.total = None

    def start(self, total_epochs: int, done_epochs: int, description: str, unit: str = "epochs") -> None:
        self.total, self.unit, self.description = total_epochs, unit, description
        self.started = self.clock()
        self.first, self.last_printed, self.pending = done_epochs, None, None

    def advance(self, epoch: int, info: dict) -> None:
        if self.total is None:
            return
        self.pending = (epoch, info)
        now = self.clock()
        if self.last_printed is None or now - self.last_printed >= self.every_s or epoch >= self.total:
            self._print(epoch, info, now)

    def _print(self, epoch: int, info: dict, now: float) -> None:
        elapsed = now - self.started
        timing = f"{_clock_text(elapsed)} elapsed"
        if self.first < epoch < self.total:  # the rate so far; none before the first epoch of this session
            timing += f", ~{_clock_text(elapsed / (epoch - self.first) * (self.total - epoch))} left"
        text = _info_text(info)
        print(f"{self.description}: {epoch}/{self.total} {self.unit}, {timing}" + (f"  {text}" if text else ""),
              file=self.file, flush=True)  # fmt: skip
        self.last_printed, self.pending = now, None

    def stop(self) -> None:
        if self.total is not None and self.pending is not None:  # the state it ended in, even between lines
            self._print(*self.pending, self.clock())
        self.total = None
