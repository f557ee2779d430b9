"""Sweeps on a real Slurm cluster (`lnsgd sweep --executor submitit`), at the tiny size.

Marked ``slurm``; skipped unless ``sinfo`` answers (``.ci/run`` brings up a single-node
cluster with ``../shared/slurm/setup_slurm.sh`` when it can). Each test submits real jobs:
a 2-point sweep, sbatch's refusals, ``scontrol requeue`` of a running job, and a rerun of
the sweep while its job is requeued, a real time limit (Slurm's USR2 warning) and preemption
by a job in the higher-priority partition. Results are compared bit for bit with in-process runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lnsgd.recipe import load_recipe
from lnsgd.sweep import read_sweep
from lnsgd.track import read_jsonl
from lnsgd.train import train

from .conftest import invoke, one_line_error, same_weights, strip_timing, weights, write_tiny


def _cluster_answers() -> str | None:
    """Why there is no cluster to test on, or None when ``sinfo`` answers."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm here (sinfo/sbatch not found); .ci/run brings up a single-node cluster as root"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed ({e})"
    if res.returncode != 0 or not res.stdout.strip():
        return f"no Slurm cluster answers (sinfo: {(res.stderr or res.stdout).strip()[:200] or 'no nodes'})"
    return None


NO_CLUSTER = _cluster_answers()
pytest.importorskip("submitit")
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or ""),
              pytest.mark.usefixtures("single_thread")]  # fmt: skip

LONG_EPOCHS = 400
LONG = {"train": {"epochs": LONG_EPOCHS, "checkpoint_every": 1000}}  # last.pt only when stopped (or at the end)
CPU1 = ("--executor", "submitit", "--cluster", "slurm", "--cpus-per-job", "1", "--timeout-min", "10")


def job_ids(sweep_dir: Path) -> list[str]:
    with_ids = [p for p in read_sweep(sweep_dir)["points"] if p.get("job_id")] if (sweep_dir / "sweep.json").exists() else []
    return [p["job_id"] for p in with_ids]


@pytest.fixture
def sweeps():
    """Sweep folders whose jobs are cancelled after the test, whatever happened."""
    dirs: list[Path] = []
    yield dirs
    ids = [j for d in dirs for j in job_ids(d)]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def squeue_state(job_id: str) -> str:
    res = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return res.stdout.strip()


def until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def sacct(*args: str) -> list[str]:
    res = subprocess.run(["sacct", "-n", "-X", "-P", *args], capture_output=True, text=True, timeout=30)
    return res.stdout.split()


def settled_sacct(*args: str, ok, timeout: float = 60) -> list[str]:
    """``sacct`` output once ``ok(output)`` holds: slurmctld sends accounting to slurmdbd
    asynchronously, so a job that has ended can read PENDING (or be missing) for a while."""
    seen: list[str] = []

    def settled() -> bool:
        seen[:] = sacct(*args)
        return ok(seen)

    with contextlib.suppress(AssertionError):
        until(settled, timeout, "sacct")
    return seen


def start_sweep(recipe: Path, *args: str) -> subprocess.Popen:
    """`lnsgd sweep` as its own process (its output in sweep.log next to the recipe), as a user would run it."""
    log = open(recipe.parent / "sweep.log", "a")  # noqa: SIM115 - closed by the child's exit
    cmd = [sys.executable, "-m", "lnsgd", "sweep", str(recipe), *args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)


def training(sweep_dir: Path, run_dir: Path) -> str:
    """The point's job id, once the job has trained a few epochs."""
    until(lambda: run_dir.joinpath("metrics.jsonl").exists() and len(read_jsonl(run_dir / "metrics.jsonl")) >= 5, 60,
          "the job to train a few epochs")  # fmt: skip
    (job,) = job_ids(sweep_dir)
    return job


def one_point_sweep(tmp_path: Path, sweeps: list[Path], extra: dict, *args: str) -> tuple[Path, subprocess.Popen]:
    """`lnsgd sweep --grid seed=0` of the tiny recipe with ``extra`` (options ``args``, default CPU1), started as
    its own process; its jobs are cancelled by the ``sweeps`` fixture after the test."""
    recipe = write_tiny(tmp_path, extra)
    sweep_dir = tmp_path / "runs" / "tiny-seed"
    sweeps.append(sweep_dir)
    return sweep_dir, start_sweep(recipe, "--grid", "seed=0", *(args or CPU1))


def requeue_when_training(sweep_dir: Path, run_dir: Path) -> str:
    """`scontrol requeue` the point's job once it has trained a few epochs.

    A requeued job waits ~2 minutes (Slurm's BeginTime) before it may start again;
    ``release`` (``scontrol update StartTime=now``) lifts that wait, so the tests stay short.
    """
    job = training(sweep_dir, run_dir)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    until(lambda: squeue_state(job) == "PENDING", 40, f"job {job} to be requeued")
    return job


def release(job: str) -> None:
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted run the requeued ones must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(write_tiny(root, LONG), ["seed=0"])
    train(recipe, root / "ref")
    return root / "ref"


def reference_run(root: Path, extra: dict) -> Path:
    """An uninterrupted in-process run of the tiny recipe with ``extra`` (seed 0)."""
    root.mkdir(parents=True, exist_ok=True)
    train(load_recipe(write_tiny(root, extra), ["seed=0"]), root / "ref")
    return root / "ref"


def assert_same_run(reference: Path, run: Path, epochs: int = LONG_EPOCHS) -> None:
    assert same_weights(weights(reference / "final.pt"), weights(run / "final.pt"))
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(len(rows))) and len(rows) == epochs + 1  # complete, no repeats
    assert strip_timing(read_jsonl(reference / "metrics.jsonl")) == strip_timing(rows)


def assert_requeued_and_done(tmp_path: Path, sweep_dir: Path, job: str, reference: Path, epochs: int, *log_says: str) -> None:
    """The sweep saw the requeue and the end, the point is done in its one job, and the run is the reference's."""
    out = (tmp_path / "sweep.log").read_text()
    assert "requeued seed=0" in out and "done   seed=0" in out and "interrupted" not in out, out
    (point,) = read_sweep(sweep_dir)["points"]
    assert point["status"] == "done" and point["job_id"] == job and point["requeues"] >= 1, point
    logs = "".join(p.read_text() for p in (sweep_dir / "submitit").glob("*_log.*"))
    assert all(s in logs for s in log_says), logs[-2000:]
    assert_same_run(reference, sweep_dir / "seed=0", epochs)


# --------------------------------------------------------------------------- the ordinary path


def test_two_point_sweep_on_the_cluster_matches_lnsgd_train(tmp_path, sweeps):
    # No --gpus-per-job: on a cluster without GPUs the default must not make sbatch refuse the jobs.
    recipe = write_tiny(tmp_path)
    sweep_dir = tmp_path / "runs" / "tiny-seed"
    sweeps.append(sweep_dir)
    res = invoke("sweep", recipe, "--grid", "seed=0,1", *CPU1)
    assert res.exit_code == 0, res.output
    data = read_sweep(sweep_dir)
    assert all(p["status"] == "done" and p["job_id"] for p in data["points"]), data["points"]
    for seed in (0, 1):
        ref = tmp_path / f"ref{seed}"
        train(load_recipe(recipe, [f"seed={seed}"]), ref)
        run = sweep_dir / f"seed={seed}"
        assert same_weights(weights(ref / "final.pt"), weights(run / "final.pt"))
        assert strip_timing(read_jsonl(ref / "metrics.jsonl")) == strip_timing(read_jsonl(run / "metrics.jsonl"))
    array = data["points"][0]["job_id"].split("_")[0]
    states = settled_sacct("-o", "State", "-j", array, ok=lambda out: len(out) == 2 and set(out) == {"COMPLETED"})
    assert states == ["COMPLETED", "COMPLETED"], f"sacct -j {array}: {states}"


# --------------------------------------------------------------------------- sbatch's refusals


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--gpus-per-job", "1"], ["--gpus-per-job 0", "gres"]),
        (["--partition", "nosuchpartition"], ["--partition nosuchpartition", "debug"]),
        (["--slurm", "bogus_key=1"], ["--slurm bogus_key", "sbatch"]),
    ],
    ids=["gpus-on-cpu-nodes", "partition", "slurm-key"],
)
def test_a_refused_submission_is_one_line_naming_the_option_and_leaves_nothing(tmp_path, sweeps, args, fragments):
    recipe = write_tiny(tmp_path)
    sweep_dir = tmp_path / "runs" / "tiny-seed"
    sweeps.append(sweep_dir)
    line = one_line_error(invoke("sweep", recipe, "--grid", "seed=0,1", *CPU1, *args))
    assert "Slurm refused the jobs" in line and all(f in line for f in fragments), line
    assert not (sweep_dir / "submitit").exists(), sorted((sweep_dir / "submitit").rglob("*"))
    assert not any(p.get("job_id") for p in read_sweep(sweep_dir)["points"])


# --------------------------------------------------------------------------- requeue


def test_scontrol_requeue_checkpoints_resumes_and_the_sweep_keeps_watching(tmp_path, sweeps, long_reference):
    sweep_dir, proc = one_point_sweep(tmp_path, sweeps, LONG)
    try:
        job = requeue_when_training(sweep_dir, sweep_dir / "seed=0")
        until(lambda: read_sweep(sweep_dir)["points"][0]["status"] == "requeued", 20, "the sweep to show the requeue")
        assert proc.poll() is None, "the sweep must keep watching a requeued job"
        release(job)
        assert proc.wait(timeout=60) == 0, (tmp_path / "sweep.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_requeued_and_done(tmp_path, sweep_dir, job, long_reference, LONG_EPOCHS, "stopped by SIGTERM")


def test_rerunning_the_sweep_while_its_job_is_requeued_starts_no_second_job(tmp_path, sweeps, long_reference):
    recipe = write_tiny(tmp_path, LONG)
    name = f"rerun-{os.getpid()}-{int(time.time())}"  # its jobs are named lnsgd-<name>: only this test's
    sweep_dir = tmp_path / "runs" / name
    run = sweep_dir / "seed=0"
    sweeps.append(sweep_dir)
    args = ("--grid", "seed=0", "--name", name, *CPU1)
    first = start_sweep(recipe, *args)
    try:
        job = requeue_when_training(sweep_dir, run)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep dies (a lost login session); its job lives on in Slurm
        first.wait(timeout=30)
    assert squeue_state(job) == "PENDING"
    # The sweep is gone but Slurm holds the job: sweep-status shows the job and Slurm's state, not "interrupted".
    (row,) = json.loads(invoke("sweep-status", sweep_dir, "--json").output)
    assert (row["status"], row["job_id"], row["slurm_state"]) == ("requeued", job, "PENDING"), row
    assert job in invoke("sweep-status", sweep_dir).output
    log = tmp_path / "sweep.log"
    log.write_text("")
    rerun = start_sweep(recipe, *args)
    try:
        until(lambda: "watching it" in log.read_text() or rerun.poll() is not None, 30, "the rerun to find the job")
        release(job)  # the requeued job starts again; the rerun watches it to the end
        assert rerun.wait(timeout=60) == 0, log.read_text()
    finally:
        if rerun.poll() is None:
            rerun.kill()
    out = log.read_text()
    assert f"its job {job} is still pending; watching it, not submitting another" in out and "start  seed=0" not in out, out
    (point,) = read_sweep(sweep_dir)["points"]
    assert point["status"] == "done" and point["job_id"] == job
    ours = settled_sacct("-o", "JobID", "--name", f"lnsgd-{name}", ok=lambda out: out == [job], timeout=20)
    assert ours == [job], f"jobs submitted for this sweep: {ours}"
    assert_same_run(long_reference, run)


# --------------------------------------------------------------------------- time limit and preemption

# Runs long enough that Slurm's time-limit warning (USR2, sent at slurmctld's next time-limit
# check, within ~30 s of the start when the limit is 1 minute) comes in the middle of training:
# 7000 epochs took 26 s in CI and the warning came just after the end; 12000 take 45-70 s here.
TIME_LIMITED_EPOCHS = 12000
TIME_LIMITED = {"train": {"epochs": TIME_LIMITED_EPOCHS, "checkpoint_every": 100_000}}


def test_a_real_time_limit_checkpoints_requeues_and_resumes_exactly(tmp_path, sweeps):
    # --timeout-min 1: every attempt gets USR2 (the warning, 90 s before a limit of 60 s) and requeues itself.
    sweep_dir, proc = one_point_sweep(tmp_path, sweeps, TIME_LIMITED, *CPU1[:-2], "--timeout-min", "1", "--max-requeues", "8")
    try:
        job = training(sweep_dir, sweep_dir / "seed=0")
        reference = reference_run(tmp_path / "reference", TIME_LIMITED)  # on the other core, while the job trains
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if squeue_state(job) == "PENDING":
                release(job)  # a requeued job waits for its BeginTime; let it start now
            time.sleep(1)
        assert proc.wait(timeout=10) == 0, (tmp_path / "sweep.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_requeued_and_done(tmp_path, sweep_dir, job, reference, TIME_LIMITED_EPOCHS, "this job is timed-out")


PREEMPTED_EPOCHS = 3000
PREEMPTED = {"train": {"epochs": PREEMPTED_EPOCHS, "checkpoint_every": 100_000}}


def test_preemption_by_the_high_priority_partition_requeues_and_resumes_exactly(tmp_path, sweeps):
    sweep_dir, proc = one_point_sweep(tmp_path, sweeps, PREEMPTED)
    preemptor = None
    try:
        job = training(sweep_dir, sweep_dir / "seed=0")
        # A job in `high` that needs every CPU of the node: Slurm preempts ours (PreemptMode=REQUEUE).
        cpus = max(int(c) for c in subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True,
                                                  timeout=30).stdout.split())  # fmt: skip
        preemptor = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", str(cpus), "-J", f"preemptor-{os.getpid()}",
                                    "-o", str(tmp_path / "preemptor.out"), "--wrap", "sleep 2"],
                                   capture_output=True, text=True, check=True, timeout=30).stdout.strip()  # fmt: skip
        until(lambda: squeue_state(job) == "PENDING", 60, f"job {job} to be preempted and requeued")
        until(lambda: read_sweep(sweep_dir)["points"][0]["status"] == "requeued", 20, "the sweep to show the requeue")
        reference = reference_run(tmp_path / "reference", PREEMPTED)  # while the preemptor runs
        until(lambda: not squeue_state(preemptor), 60, "the preempting job to end")
        release(job)
        assert proc.wait(timeout=120) == 0, (tmp_path / "sweep.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        if preemptor:
            subprocess.run(["scancel", preemptor], capture_output=True, timeout=30)
    assert_requeued_and_done(tmp_path, sweep_dir, job, reference, PREEMPTED_EPOCHS, "stopped by SIGTERM", "PREEMPTION")


def test_sigterm_then_usr2_as_submitit_simulates_preemption_requeues_and_resumes_exactly(tmp_path, sweeps, long_reference):
    # submitit's own job._interrupt(): `scancel --signal SIGTERM`, then `scancel --signal USR2`, in a row.
    sweep_dir, proc = one_point_sweep(tmp_path, sweeps, LONG)
    try:
        job = training(sweep_dir, sweep_dir / "seed=0")
        for sig in ("SIGTERM", "USR2"):
            subprocess.run(["scancel", job, "--signal", sig], check=True, timeout=30)
        until(lambda: squeue_state(job) == "PENDING", 40, f"job {job} to be requeued")
        release(job)
        assert proc.wait(timeout=60) == 0, (tmp_path / "sweep.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "sweep.log").read_text()
    assert "done   seed=0" in out and "interrupted" not in out and "failed" not in out, out
    logs = "".join(p.read_text() for p in (sweep_dir / "submitit").glob("*_log.*"))
    assert "KeyboardInterrupt" not in logs and "Traceback" not in logs, logs[-3000:]
    (point,) = read_sweep(sweep_dir)["points"]
    assert point["status"] == "done" and point["job_id"] == job
    assert_same_run(long_reference, sweep_dir / "seed=0")
