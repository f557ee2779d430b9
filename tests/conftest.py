"""Shared fixtures: tiny recipes on offline data, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

# Never let a test reach the network.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "train_size": 200, "test_size": 100},
    "model": {"name": "mlp", "width": 16},
    "loss": "cross_entropy",
    "noise": {"kind": "flip", "p": 0.2},
    "optim": {"lr": 0.1, "batch_size": 32},
    "train": {"epochs": 3, "eval_every": 1, "checkpoint_every": 1},
}


def deep_update(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a tiny recipe (TINY updated with ``extra``) whose runs go under tmp_path/runs."""

    def write(extra: dict | None = None, name: str = "recipe.yaml") -> Path:
        raw = deep_update(TINY, {"log": {"dir": str(tmp_path / "runs")}})
        raw = deep_update(raw, extra or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture
def cli():
    from lnsgd.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def one_line_error(result) -> str:
    """Assert the CLI failed with one clear line and no traceback; return that line."""
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), text
    return lines[-1]


def interrupt_at_epoch(epoch: int, phase: str | None = None):
    """A progress display that sends this process SIGINT once ``epoch`` (of ``phase``, if given) is done: Ctrl-C, on cue."""
    import signal

    from lnsgd.track import Progress

    class InterruptAtEpoch(Progress):
        current = None

        def start(self, total, done, description, unit="epochs"):
            self.current = description

        def advance(self, e, info):
            if e == epoch and phase in (None, self.current):
                os.kill(os.getpid(), signal.SIGINT)

    return InterruptAtEpoch()


TIMING = ("time_s", "throughput/img_per_s")


def strip_timing(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock columns, which differ between identical runs."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)["model"]


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def single_thread():
    """Children run with OMP_NUM_THREADS=1 (much faster for tiny models on shared cores; sbatch
    exports it to Slurm jobs too); in-process references use one thread, so results compare bit
    for bit. For modules that start runs in other processes: pytestmark usefixtures."""
    import torch

    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


def write_tiny(folder: Path, extra: dict | None = None, name: str = "recipe.yaml") -> Path:
    """The tiny recipe, two epochs, logging below ``folder``, with ``extra`` merged in."""
    raw = deep_update(TINY, {"train": {"epochs": 2}, "log": {"dir": str(folder / "runs")}})
    path = folder / name
    path.write_text(yaml.safe_dump(deep_update(raw, extra or {})))
    return path


def invoke(*args):
    """The CLI in-process, exceptions not caught (a traceback fails the test)."""
    from lnsgd.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
