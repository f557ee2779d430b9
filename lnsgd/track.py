"""One metrics sink: metrics.jsonl always, wandb when enabled; and the progress display.

Loggers share one small interface (``log(row)``, ``close()``), so switching disk ↔
wandb is a recipe change. A tracking failure never kills a run: wandb errors are
reported once as a warning and wandb is switched off (or to offline mode).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lnsgd.errors import LnsgdError

if TYPE_CHECKING:  # keep this module light: lnsgd.report reads metrics through it
    from lnsgd.recipe import WandbConfig


def _clean(value: Any) -> Any:
    """JSON-safe value: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    """Appends one JSON object per line, flushed so a crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a")

    def log(self, row: dict) -> None:
        self.file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


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
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LnsgdError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if index == len(lines) - 1:
                break  # torn last line of a run in progress
            raise LnsgdError(
                f"{path}, line {number}: not valid JSON ({exc.msg}); every line but a torn last one must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise LnsgdError(f"{path}, line {number}: expected a JSON object of metrics, got {type(row).__name__}")
        rows.append(row)
    return rows


def truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` keeping only rows for which ``keep(row)`` holds (used when resuming)."""
    rows = [r for r in read_jsonl(path) if keep(r)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


class WandbSink:
    """Mirrors rows to Weights & Biases; imported only when enabled."""

    def __init__(self, config: WandbConfig, run_dir: Path, name: str, recipe: dict, resume_id: str | None = None):
        self.run = None
        self.warned = False
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
                self._warn(f"wandb online failed ({str(e).splitlines()[0][:120]}); continuing offline: `wandb sync {run_dir}/wandb` later")
                try:
                    self.run = wandb.init(mode="offline", **kwargs)
                except Exception as e2:  # noqa: BLE001
                    self._warn(f"wandb offline failed too ({e2}); continuing without wandb")
            else:
                self._warn(f"wandb failed ({e}); continuing without wandb")

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def _warn(self, msg: str) -> None:
        if not self.warned:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self.warned = True

    def log(self, row: dict) -> None:
        if self.run is None:
            return
        try:
            step = row.get("step")
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}, step=step)
        except Exception as e:  # noqa: BLE001
            self._warn(f"wandb logging failed ({e}); continuing without wandb")
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:  # noqa: BLE001
                pass


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
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self.bar.update(self.task, completed=epoch, info=text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
