"""Faults a long run meets, each injected for real: a full disk, SIGKILL mid-write, a dying
tracker, corrupt run-folder files, unreadable or odd input. Each must end in one line (or a
warning) with every file that existed before the fault intact, and resume exactly."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from lnsgd.errors import LnsgdError
from lnsgd.track import Progress, read_jsonl

from .conftest import one_line_error, same_weights, strip_timing, weights

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def tmpfs():
    """Mount a small tmpfs (as root); skip where mounting is not permitted. Unmounted on teardown."""
    mounted: list[Path] = []

    def mount(path: Path, size: str, *options: str) -> Path:
        if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                             capture_output=True, text=True)  # fmt: skip
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system has no byte left; return it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    chunk = 1 << 16
    try:
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


def recipe_file(tmp_path: Path, log_dir: Path, name: str = "recipe.yaml", **sections) -> Path:
    """A tiny recipe (digits, MLP) writing under ``log_dir``; keyword arguments update its sections."""
    raw = {
        "name": "tiny", "seed": 0, "device": "cpu", "data": {"name": "digits", "train_size": 200, "test_size": 100},
        "model": {"name": "mlp", "width": 16}, "loss": "cross_entropy", "noise": {"kind": "flip", "p": 0.2},
        "optim": {"lr": 0.1, "batch_size": 32}, "train": {"epochs": 3, "eval_every": 1, "checkpoint_every": 1},
        "log": {"dir": str(log_dir)},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same training: final weights bit for bit, metrics but for wall-clock columns."""
    assert same_weights(weights(a / "final.pt"), weights(b / "final.pt"))
    assert strip_timing(read_jsonl(a / "metrics.jsonl")) == strip_timing(read_jsonl(b / "metrics.jsonl"))


class AtStop(Progress):
    """A progress display that calls ``action(epoch)`` when a phase ends: right before final.pt and summary.json."""

    def __init__(self, action):
        self.action, self.epoch = action, None

    def advance(self, epoch, info):
        self.epoch = epoch

    def stop(self):
        if self.epoch is not None:
            self.action(self.epoch)


# --------------------------------------------------------------------------- 1. a full disk


def test_full_disk_while_checkpointing_stops_with_one_line_and_resumes_exactly(cli, tmp_path, tmpfs):
    # The case: a 600 KB disk holds one 362 KB checkpoint, not the second one beside it.
    disk = tmpfs(tmp_path / "disk", "600k")
    path = recipe_file(tmp_path, disk, model={"width": 256})
    line = one_line_error(cli("train", path, "--quiet"))
    run = disk / "tiny"
    assert f"no space left in {run / 'checkpoints'}: last.pt needs" in line and "KB is free" in line, line
    assert "last good checkpoint" in line and "(epoch 1)" in line and "--resume" in line, line
    assert temp_files(run) == []
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert all(isinstance(r, dict) for r in read_jsonl(run / "metrics.jsonl"))

    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    res = cli("train", path, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert cli("train", path, f"log.dir={tmp_path / 'ref'}", "--quiet").exit_code == 0
    same_run(tmp_path / "ref/tiny", run)
    assert temp_files(run) == []


def test_full_disk_while_writing_metrics_leaves_no_torn_row_and_resumes_exactly(cli, tmp_path, tmpfs, monkeypatch):
    # Rows are appended into tmpfs pages, so the disk is filled just before a row that must start a new page,
    # from the hook the loop calls right before it writes a row (a sharpness hook that measures nothing).
    disk = tmpfs(tmp_path / "disk", "1m")
    path = recipe_file(tmp_path, disk, train={"epochs": 40})
    page = os.statvfs(disk).f_bsize
    metrics = disk / "tiny/metrics.jsonl"
    seen = {}

    def fill_before_a_row_that_needs_a_new_page(model, data, phase, epoch):
        rows = metrics.read_bytes()
        if "epoch" not in seen and epoch >= 2 and len(rows) % page + len(rows.splitlines()[-1]) + 1 - 40 > page:
            fill_disk(disk)
            seen.update(epoch=epoch, metrics=rows)
        return {}

    monkeypatch.setattr("lnsgd.sharpness.training_hook", lambda recipe: fill_before_a_row_that_needs_a_new_page)
    line = one_line_error(cli("train", path, "--quiet"))
    assert "epoch" in seen, "the disk was never filled"
    assert f"no space left in {metrics.parent}: metrics.jsonl needs" in line and "B is free" in line, line
    assert f"(epoch {seen['epoch'] - 1})" in line, line
    assert metrics.read_bytes() == seen["metrics"]  # the row that did not fit is not there, not even half of it
    assert temp_files(disk / "tiny") == []
    assert torch.load(disk / "tiny/checkpoints/last.pt", weights_only=True)["epoch"] == seen["epoch"] - 1

    (disk / "filler").unlink()
    monkeypatch.undo()
    res = cli("train", path, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert cli("train", path, f"log.dir={tmp_path / 'ref'}", "--quiet").exit_code == 0
    same_run(tmp_path / "ref/tiny", disk / "tiny")


def test_full_disk_while_writing_the_summary_keeps_final_pt_and_resume_writes_it(cli, tmp_path, tmpfs, monkeypatch):
    # "refs" and "disk": names of one length, so both final.pt files (which store log.dir) have one size.
    assert cli("train", recipe_file(tmp_path, tmp_path / "refs"), "--quiet").exit_code == 0
    ref = tmp_path / "refs/tiny"
    disk = tmpfs(tmp_path / "disk", "1m")
    path = recipe_file(tmp_path, disk)
    page = os.statvfs(disk).f_bsize
    final_pages = -(-(ref / "final.pt").stat().st_size // page)

    def leave_room_for_final_pt_only(epoch):
        if epoch == 3 and not (disk / "filler").exists():
            filler = fill_disk(disk)
            os.truncate(filler, filler.stat().st_size - final_pages * page)

    monkeypatch.setattr("lnsgd.cli.run.progress_for", lambda quiet: AtStop(leave_room_for_final_pt_only))
    line = one_line_error(cli("train", path))
    run = disk / "tiny"
    assert f"no space left in {run}: summary.json needs" in line and "the run is trained and checkpointed" in line, line
    assert not (run / "summary.json").exists() and temp_files(run) == []
    assert same_weights(weights(ref / "final.pt"), weights(run / "final.pt"))

    (disk / "filler").unlink()
    monkeypatch.undo()
    res = cli("train", path, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    got, want = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert strip_timing([got["final"]]) == strip_timing([want["final"]]) and (got["epochs"], got["steps"]) == (3, want["steps"])
    same_run(ref, run)


def test_temporary_files_are_unique_per_writer_and_dead_writers_files_are_cleared(tmp_path):
    from lnsgd.checkpoint import save_atomic
    from lnsgd.track import temp_path, write_atomic

    target = tmp_path / "last.pt"
    assert str(os.getpid()) in temp_path(target).name and temp_path(target) != target.with_name("last.pt.tmp")
    # A writer that died mid-write (its pid is gone) and one of old lnsgd leave temporary files; a live one's stays.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = temp_path(target).with_name(temp_path(target).name.replace(f".{os.getpid()}.", f".{dead.stdout.strip()}."))
    live = temp_path(target).with_name(temp_path(target).name.replace(f".{os.getpid()}.", f".{os.getppid()}."))
    for p in (stale, live, target.with_name("last.pt.tmp")):
        p.write_bytes(b"half a checkpoint")
    save_atomic({"model": {"w": torch.ones(2)}}, target)
    assert temp_files(tmp_path) == [live]
    write_atomic(tmp_path / "summary.json", "{}")
    assert (tmp_path / "summary.json").read_text() == "{}" and temp_files(tmp_path) == [live]


# --------------------------------------------------------------------------- 2. SIGKILL in the middle of a checkpoint write

KILLED_MID_WRITE = """
import io, os, sys
import torch
real_save = torch.save

def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:  # last.pt of epoch 2
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        target = f if hasattr(f, "write") else open(f, "wb")
        target.write(buffer.getvalue()[: buffer.tell() // 2])
        target.flush()
        print("half written", flush=True)
        sys.stdin.read()  # the handshake: block here until the test kills this process
    return real_save(obj, f, *args, **kwargs)

torch.save = save
from lnsgd.cli import main
sys.argv = ["lnsgd", "train", sys.argv[1], "--quiet"]
main()
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(cli, tmp_path):
    path = recipe_file(tmp_path, tmp_path / "runs", optim={"momentum": 0.9}, train={"epochs": 4})
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "half written", child.stderr.read()
        run = tmp_path / "runs/tiny"
        (partial,) = temp_files(run)
        assert partial.name.endswith(f".{child.pid}.tmp") and partial.stat().st_size > 0
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
        child.stderr.close()
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["epoch"] == 1

    res = cli("train", path, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert temp_files(run) == []  # the killed writer's half file is cleared by the next save
    assert cli("train", path, f"log.dir={tmp_path / 'ref'}", "--quiet").exit_code == 0
    same_run(tmp_path / "ref/tiny", run)


# --------------------------------------------------------------------------- 3. the tracker dies mid-run


def fake_wandb(fail_online: bool, rows_before_dying: int):
    """A wandb module whose runs take ``rows_before_dying`` rows and then raise, as a dead service does."""
    logged: list[dict] = []

    class DyingRun:
        id = "fake-run"

        def log(self, row, step=None):
            if len(logged) == rows_before_dying:
                raise ConnectionResetError("wandb service died\n(and a second line of detail)")
            logged.append({"step": step, **row})

        def finish(self):
            pass

    def init(mode, **kwargs):
        if mode == "online" and fail_online:
            raise RuntimeError("network unreachable")
        return DyingRun()

    return types.SimpleNamespace(init=init), logged


@pytest.mark.parametrize("fail_online", [False, True], ids=["online", "online-failed-then-offline"])
def test_wandb_dying_mid_run_is_one_warning_and_metrics_stay_complete(cli, tmp_path, monkeypatch, fail_online):
    module, logged = fake_wandb(fail_online, rows_before_dying=2)
    monkeypatch.setitem(sys.modules, "wandb", module)
    path = recipe_file(tmp_path, tmp_path / "runs", log={"dir": str(tmp_path / "runs"), "wandb": {"mode": "online"}})
    res = cli("train", path, "--quiet")
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    died = [ln for ln in warnings if "wandb logging failed" in ln]
    assert len(died) == 1 and "after 2 rows" in died[0] and "metrics.jsonl keeps every row" in died[0], res.output
    assert "second line" not in res.output
    assert len(warnings) == 1 + fail_online  # and, where online failed first, that warning too
    rows = read_jsonl(tmp_path / "runs/tiny/metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and [r["epoch"] for r in logged] == [0, 1]
    assert (tmp_path / "runs/tiny/summary.json").exists()


# --------------------------------------------------------------------------- 4. corrupt run-folder files


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A one-point sweep, run once: its point is a finished run folder that tests copy and corrupt."""
    from typer.testing import CliRunner

    from lnsgd.cli import app

    root = tmp_path_factory.mktemp("sweep")
    path = recipe_file(root, root / "runs")
    res = CliRunner().invoke(app, ["sweep", str(path), "--grid", "seed=0", "--name", "s"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root / "runs/s", path


def copy_sweep(finished_sweep, tmp_path: Path, file: str | None = None, content: bytes = b"") -> tuple[Path, Path]:
    """A copy of the sweep and its run folder, with ``file`` of the run replaced by ``content``."""
    copy = tmp_path / "s"
    shutil.copytree(finished_sweep[0], copy)
    run = copy / "seed=0"
    if file is not None:
        target = run / file
        if file == "metrics.jsonl":  # a bad line in the middle, not a torn last one
            lines = target.read_bytes().splitlines(keepends=True)
            content = b"".join(lines[:2] + [content + b"\n"] + lines[2:])
        target.write_bytes(content)
    return copy, run


def resume_args(run: Path) -> tuple:
    """``lnsgd train`` continuing ``run`` with its own recipe, one epoch longer."""
    return ("train", run / "recipe.yaml", "train.epochs=4", "--resume", "--out", run, "--quiet")


BAD_FILES = [
    ("metrics.jsonl", b'{"epoch": 1, "train/loss": 0.5', "metrics.jsonl, line 3: not valid JSON"),
    ("metrics.jsonl", b'{"epoch": 1, "train/loss": \xff\xfe}', "metrics.jsonl, line 3: not valid JSON (not UTF-8 text)"),
    ("summary.json", b'{"final": {"test/acc": 0.5},\n  "epochs": }', "summary.json, line 2: not valid JSON"),
    ("summary.json", b'{"name": "\xff"}', "summary.json, line 1: not UTF-8 text"),
    ("recipe.yaml", b"name: tiny\nseed: [0\noptim: {lr: 0.1}\n", "recipe.yaml, line 3: not valid YAML"),
    ("recipe.yaml", b"name: tiny\nseed: 0\nmodel: \xff\n", "recipe.yaml, line 3: not UTF-8 text"),
]


@pytest.mark.parametrize("file, content, fragment", BAD_FILES, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_FILES)])
def test_corrupt_run_folder_files_are_one_line_naming_file_and_line(cli, tmp_path, finished_sweep, file, content, fragment):
    sweep, run = copy_sweep(finished_sweep, tmp_path, file, content)
    for args in (("plot", run, "--out", tmp_path / "plots"), ("compare", run), ("compare", sweep)):
        line = one_line_error(cli(*args))
        assert str(run / file) in line and fragment in line, (args, line)
    res = cli("sweep-status", sweep, "--json")
    # Status answers for every point, with no traceback; a point whose metrics cannot be read
    # says so in its own row (the other points' rows are as before).
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    rows = {r["id"]: r for r in json.loads(res.output)}
    broken = next(r for r in rows.values() if str(run.name) == r["id"] or r["id"] in str(run))
    if file == "metrics.jsonl":
        assert fragment in (broken["error"] or ""), broken
    assert all(r["epoch"] is not None for r in rows.values() if r is not broken)
    if file == "metrics.jsonl":  # --resume rewrites metrics.jsonl up to its checkpoint, so it must read it
        line = one_line_error(cli(*resume_args(run)))
        assert str(run / file) in line and fragment in line, line


def test_checkpoint_from_a_newer_lnsgd_is_one_line_for_resume_measure_and_status(cli, tmp_path, finished_sweep):
    sweep, run = copy_sweep(finished_sweep, tmp_path)
    last = run / "checkpoints/last.pt"
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "format": "lnsgd-checkpoint-2", "lnsgd_version": "9.0.0"}, last)
    resume = resume_args(run)
    for args in (resume, ("measure-sharpness", last, "--quiet", "--hvps", "4")):
        line = one_line_error(cli(*args))
        assert f"checkpoint {last} was written by lnsgd 9.0.0 in format lnsgd-checkpoint-2, newer than" in line, line
        assert "upgrade lnsgd" in line
    res = cli("sweep-status", sweep)
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output

    # The same format but without what --resume needs (a field a newer lnsgd renamed): one line naming it.
    torch.save({k: v for k, v in ckpt.items() if k != "batch"} | {"lnsgd_version": "9.0.0"}, last)
    line = one_line_error(cli(*resume))
    assert f"checkpoint {last} (lnsgd 9.0.0) has no batch, which --resume needs" in line, line


def test_a_recipe_given_where_a_checkpoint_is_expected_is_named_as_text(cli, tmp_path, finished_sweep):
    run = finished_sweep[0] / "seed=0"
    for args in (("measure-sharpness", run / "recipe.yaml", "--quiet"),
                 ("train", finished_sweep[1], f"init.checkpoint={run / 'recipe.yaml'}", "name=other", "--quiet")):  # fmt: skip
        line = one_line_error(cli(*args))
        assert f"checkpoint {run / 'recipe.yaml'} is truncated, corrupt or not a torch file (it holds text" in line, line
        assert "Re-running" not in line and "weights_only" not in line and line.endswith("of a run"), line


# --------------------------------------------------------------------------- 5. bad input


def test_an_empty_recipe_is_refused(cli, tmp_path):
    for text in ("", "# only a comment\n", "{}\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        for command in ("validate", "train"):
            line = one_line_error(cli(command, path))
            assert f"recipe {path} is empty" in line, line
    assert not (tmp_path / "runs").exists()


def read_as_nobody(path: Path) -> str:
    """What ``load_recipe(path)`` answers in a forked child that dropped root for the user nobody."""
    from lnsgd.recipe import load_recipe

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports through the pipe and never returns into pytest
        try:
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except PermissionError as e:
                result = f"skip: cannot drop root here ({e})"
            else:
                try:
                    load_recipe(path)
                    result = "read it"
                except LnsgdError as e:
                    result = f"LnsgdError: {e}"
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    result = f"{type(e).__name__}: {e}"
            os.write(write, result.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = f.read()
    os.waitpid(pid, 0)
    if result.startswith("skip:"):
        pytest.skip(result)
    return result


def test_a_recipe_that_cannot_be_read_is_one_line(tmp_path):
    # As root every file is readable, so a forked child drops to nobody and meets a real PermissionError.
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("needs root, to drop to another user")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="lnsgd-faults-"))  # pytest's own tmp folders are closed to other users
    try:
        base.chmod(0o755)
        unreadable = recipe_file(base, base / "runs")
        unreadable.chmod(0)
        closed = base / "closed"
        closed.mkdir(mode=0o700)
        hidden = recipe_file(closed, base / "runs")
        for path in (unreadable, hidden):
            expected = f"LnsgdError: cannot read recipe {path} (Permission denied); check that the file is readable"
            assert read_as_nobody(path) == expected
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("values", [".nan,1", "1,.inf", "-.inf,1", "[.nan],[1]"])
def test_grid_values_must_be_finite(cli, tmp_path, values):
    path = recipe_file(tmp_path, tmp_path / "runs")
    line = one_line_error(cli("sweep", path, "--grid", f"optim.lr={values}", "--dry-run"))
    assert "grid key optim.lr:" in line and "is not a finite number" in line, line
    assert not (tmp_path / "runs").exists()


def test_a_float64_callable_needs_no_dtype_and_an_unusable_one_says_how_to_pass_it():
    from lnsgd import curvature

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    eigenvalues = torch.linspace(-1.0, 5.0, 12, dtype=torch.float64)
    A = q @ torch.diag(eigenvalues) @ q.T
    trace = curvature.estimate_trace(lambda v: A @ v, 12, 24)  # 12 sketch vectors: exact
    assert trace.value == pytest.approx(eigenvalues.sum().item(), abs=1e-9)
    top = curvature.top_eigenvalues(lambda v: A @ v, 12, k=2, num_matvecs=12)
    assert top.dtype == torch.float64 and torch.allclose(top, eigenvalues[-2:].flip(0), atol=1e-9)
    # float32 stays float32 (no extra cost in precision or memory).
    A32 = A.float()
    assert curvature.estimate_trace(lambda v: A32 @ v, 12, 24).value == pytest.approx(eigenvalues.sum().item(), abs=1e-4)
    A16 = A.half()
    with pytest.raises(LnsgdError, match=r"pass the dtype and device its tensors use, e\.g\. dtype=torch\.float64"):
        curvature.estimate_trace(lambda v: A16 @ v, 12, 12)


def test_plot_and_demo_into_an_unwritable_folder_are_one_line(cli, tmp_path, finished_sweep, tmpfs):
    run = finished_sweep[0] / "seed=0"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line_error(cli("plot", run, "--out", blocker / "plots"))
    assert f"cannot write figures to --out {blocker / 'plots'} (Not a directory" in line, line
    read_only = tmpfs(tmp_path / "ro", "64k", "ro")
    line = one_line_error(cli("plot", run, "--out", read_only / "plots"))
    assert f"cannot write figures to --out {read_only / 'plots'} (Read-only file system" in line, line
    for out in (blocker / "demo", read_only / "demo"):
        line = one_line_error(cli("demo", "--quick", "--out", out, "--quiet"))
        assert f"cannot write demo folder {out}" in line, line


def test_output_files_into_an_unwritable_folder_are_one_line(cli, write_recipe, tmp_path):
    # compare --csv, measure-sharpness --json and bench --json write where they are told.
    res = cli("train", write_recipe({"train": {"epochs": 1}}), "--quiet")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line_error(cli("compare", run, "--csv", blocker / "final.csv"))
    assert str(blocker) in line and "writable" in line
    line = one_line_error(cli("measure-sharpness", run / "final.pt", "--hvps", "4", "--examples", "20", "--measure", "trace",
                              "--json", blocker / "sharp.json", "--quiet"))  # fmt: skip
    assert str(blocker) in line


# --------------------------------------------------------------------------- one writer per run folder

HOLD_AT_EPOCH_2 = """
import sys
from pathlib import Path
import lnsgd.track as track
marker = Path(sys.argv[2])
def advance(self, epoch, info):
    if epoch == 2:  # epoch 1 is checkpointed; hold the run (and its lock) until killed
        marker.write_text("holding")
        sys.stdin.read()
track.Progress.advance = advance
from lnsgd.cli import main
sys.argv = ["lnsgd", "train", sys.argv[1], "--quiet"]
main()
"""


def test_a_second_writer_is_refused_while_a_run_trains_and_a_killed_writers_lock_is_not(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the child's folder: relative defaults (data.root) resolve alike
    recipe = write_recipe({"train": {"epochs": 4}})
    ref = write_recipe({"train": {"epochs": 4}, "name": "ref"}, name="ref.yaml")
    assert cli("train", ref, "--quiet").exit_code == 0
    marker = tmp_path / "holding"
    child = subprocess.Popen([sys.executable, "-c", HOLD_AT_EPOCH_2, str(recipe), str(marker)], cwd=tmp_path,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        for _ in range(600):  # a handshake, not a race: the child waits for us once the marker exists
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), child.communicate()[1]
        run = tmp_path / "runs" / "tiny"
        rows = (run / "metrics.jsonl").read_bytes()
        for flag in ("--resume", "--force"):
            line = one_line_error(cli("train", recipe, flag, "--quiet"))
            assert "in use by pid" in line and str(child.pid) in line, line
        assert (run / "metrics.jsonl").read_bytes() == rows  # --force removed nothing
    finally:
        child.kill()
        child.communicate()
    # The kernel released the dead writer's lock: resuming is allowed and exact.
    res = cli("train", recipe, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert same_weights(weights(tmp_path / "runs/ref/final.pt"), weights(tmp_path / "runs/tiny/final.pt"))
