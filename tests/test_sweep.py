"""Sweeps: grid expansion and naming, both executors end to end on tiny runs, interruption
and exact continuation, preemption of a submitit job, the shipped sweep specs, bad input."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from lnsgd.recipe import load_recipe, recipe_to_dict
from lnsgd.sweep import (
    Axis,
    ProcessExecutor,
    expand,
    parse_grid_option,
    plan_sweep,
    point_ids,
    read_sweep,
    split_values,
    value_text,
)
from lnsgd.track import read_jsonl
from lnsgd.train import train

from .conftest import invoke, one_line_error, same_weights, strip_timing, weights, write_tiny

pytestmark = pytest.mark.usefixtures("single_thread")

SPECS = sorted((Path(__file__).parent.parent / "recipes" / "sweeps").glob("*.sweep"))
GRID = ["--grid", "optim.lr=0.05,0.1", "--grid", "seed=0,1"]
IDS = ["lr=0.05,seed=0", "lr=0.05,seed=1", "lr=0.1,seed=0", "lr=0.1,seed=1"]


# --------------------------------------------------------------------------- grid expansion and naming (unit)


def test_grid_option_parsing_types_values_as_yaml():
    assert parse_grid_option("optim.lr=0.5,1,2") == ("optim.lr", [0.5, 1, 2])
    assert parse_grid_option("noise.kind=flip,none") == ("noise.kind", ["flip", "none"])
    assert parse_grid_option("log.wandb.tags=[a,b],[c]") == ("log.wandb.tags", [["a", "b"], ["c"]])
    assert split_values("'a,b',c") == ["'a,b'", "c"]


@pytest.mark.parametrize("value", [0.5, 1, 1e-5, 2.0, True, None, "flip", "0.5", "a b", "x,y", ["a", "b"], "/abs/p.pt"])
def test_value_text_round_trips_through_yaml(value):
    assert yaml.safe_load(value_text(value)) == value


def test_cartesian_product_in_key_order_and_zip():
    axes = [Axis("optim.lr", (0.5, 1, 2)), Axis("seed", (0, 1))]
    points = expand(axes)
    assert len(points) == 6 and points[0] == {"optim.lr": 0.5, "seed": 0} and points[1] == {"optim.lr": 0.5, "seed": 1}
    assert point_ids(axes, points)[:3] == ["lr=0.5,seed=0", "lr=0.5,seed=1", "lr=1,seed=0"]
    zipped = expand([Axis("optim.lr", (0.5, 1)), Axis("seed", (0, 1))], zip_=True)
    assert zipped == [{"optim.lr": 0.5, "seed": 0}, {"optim.lr": 1, "seed": 1}]


def test_ids_are_readable_safe_and_unique():
    # Two keys with the same last component keep their full keys; paths are named by their folder.
    axes = [Axis("optim.schedule.gamma", (0.1,)), Axis("x.gamma", (0.2,)),
            Axis("init.checkpoint", ("/r/fb/final.pt", "/r/adv/final.pt", "/s/adv/final.pt"))]  # fmt: skip
    ids = point_ids(axes, expand(axes))
    assert ids[0] == "optim.schedule.gamma=0.1,x.gamma=0.2,checkpoint=fb"
    assert ids[1].endswith("checkpoint=adv-2") and ids[2].endswith("checkpoint=adv-3")
    assert len(set(ids)) == 3
    weird = [Axis("data.root", ("a b/c:d*?",))]
    (wid,) = point_ids(weird, expand(weird))
    assert "/" not in wid and " " not in wid and "*" not in wid and "?" not in wid
    long = [Axis("log.wandb.project", ("p" * 300,))]
    (lid,) = point_ids(long, expand(long))
    assert len(lid) <= 100


def test_plan_validates_every_point_and_sets_name_group_and_tags(tmp_path):
    plan = plan_sweep(write_tiny(tmp_path), ["optim.lr=0.05,0.1", "seed=0,1"], ["train.epochs=3"], name="s")
    assert [p.id for p in plan.points] == IDS
    p = plan.points[1]
    assert p.dir == tmp_path / "runs" / "s" / "lr=0.05,seed=1"
    assert (p.recipe.optim.lr, p.recipe.seed, p.recipe.train.epochs) == (0.05, 1, 3)
    assert p.recipe.name == "s/lr=0.05,seed=1"
    assert p.recipe.log.wandb.group == "s" and p.recipe.log.wandb.tags == ("lr=0.05", "seed=1")
    # The run folder's recipe is exactly what `lnsgd train` builds from the point's overrides.
    assert load_recipe(plan.recipe_path, p.overrides) == p.recipe


def test_runs_are_pinned_round_robin_to_the_least_busy_gpu():
    from types import SimpleNamespace

    ex = ProcessExecutor(jobs=3, gpus=["2", "5"])
    running = {}
    for pid in "abc":
        running[pid] = SimpleNamespace(gpu=ex._pick_gpu(running))
    assert [c.gpu for c in running.values()] == ["2", "5", "2"]
    del running["b"]
    assert ex._pick_gpu(running) == "5"
    assert ProcessExecutor(jobs=2, gpus=["0"])._pick_gpu({}) is None  # one GPU (or none): no pinning


# --------------------------------------------------------------------------- the shipped sweep specs


def test_sweep_specs_are_shipped():
    assert {p.name for p in SPECS} >= {"quickstart-noise.sweep", "fig3-cifar10.sweep", "fig4-cifar10-momentum.sweep",
                                       "fig3-cifar10-smoothing-control.sweep", "fig4-cifar10-momentum-lambda-matched.sweep"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_sweep_spec_expands_and_each_point_validates(path: Path):
    text = path.read_text()
    assert text.startswith("#") and "lnsgd sweep " + str(path.relative_to(path.parent.parent.parent)) in text, (
        f"{path}: the header should show the command that runs it"
    )
    plan = plan_sweep(path)  # loads and validates the recipe of every point
    assert len(plan.points) >= 2 and len({p.id for p in plan.points}) == len(plan.points)
    assert all(p.recipe.log.wandb.group == plan.name for p in plan.points)
    if path.name.startswith(("fig3", "fig4")):
        r = plan.points[0].recipe
        assert (r.data.name, r.model.name, r.noise.kind, r.noise.p, r.optim.batch_size) == (
            "cifar10",
            "resnet18",
            "smooth" if "smoothing-control" in path.name else "flip",
            0.2,
            256,
        )
        assert r.model.group_size in (None, 32)  # the authors' GroupNorm: 32 channels per group
        assert {p.recipe.seed for p in plan.points} == {0, 1, 2}
        assert len({p.recipe.init.checkpoint for p in plan.points}) == 2
        assert {p.recipe.optim.momentum for p in plan.points} == ({0.0} if path.name.startswith("fig3") else {0.9})
        # Figure 4 runs at Figure 3's learning rates (the paper, Sec. 5.1); only the named extra divides them by 10.
        lrs = {p.recipe.optim.lr for p in plan.points}
        assert lrs == ({0.05, 0.1, 0.2} if "lambda-matched" in path.name else {0.5, 1.0, 2.0})


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--grid", "optim.lrr=0.1,0.2"], "optim.lrr: unknown key"),
        (["--grid", "optim.lr=fast,slow"], "optim.lr"),
        (["--grid", "seed=0,1", "--grid", "noise.p=0.1,1.5"], "noise.p"),
        ([], "the grid is empty"),
        (["--grid", "optim.lr"], "expected key=v1,v2"),
        (["--grid", "optim.lr="], "empty value"),
        (["--grid", "optim.lr=0.1,,0.2"], "empty value"),
        (["--grid", "=1,2"], "expected key=v1,v2"),
        (["--grid", "optim.lr=0.1,0.2", "--grid", "seed=0,1,2", "--zip"], "equal lengths"),
        (["--grid", "seed=0,0"], "twice"),
        (["--grid", "seed=0,1", "--grid", "seed=2"], "twice"),
        (["--grid", "name=a,b"], "the sweep sets it"),
        (["--grid", "seed=0,1", "--executor", "slurm"], "expected process or submitit"),
        (["--grid", "seed=0,1", "--name", "a/b"], "plain folder name"),
        (["--grid", "seed=0,1", "optim.lr"], "expected key=value"),
        (["--grid", "init.checkpoint=/nonexistent/final.pt,/nonexistent/b.pt"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_starts_nothing(tmp_path, args, fragment):
    line = one_line_error(invoke("sweep", write_tiny(tmp_path), *args))
    assert fragment in line, line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.jsonl"))


@pytest.mark.parametrize(
    "sbatch_says, options, fragments",
    [
        ("sbatch: error: Invalid generic resource (gres) specification", {"gpus_per_job": 1}, ["--gpus-per-job 0"]),
        ("sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: Invalid partition "
         "name specified", {"partition": "gpu"}, ["--partition gpu", "invalid partition specified: gpu"]),
        ("sbatch: unrecognized option '--bogus-key=1'\nTry \"sbatch --help\" for more information", {"slurm": {"bogus_key": 1}},
         ["--slurm bogus_key", "sbatch has no option --bogus-key"]),
    ],
    ids=["gres", "partition", "slurm-key"],
)  # fmt: skip
def test_an_sbatch_refusal_becomes_one_line_naming_the_option(tmp_path, sbatch_says, options, fragments):
    pytest.importorskip("submitit")
    from lnsgd.sweep import SubmititExecutor, SubmititOptions

    runner = SubmititExecutor(SubmititOptions(cluster="local", **options))
    runner.make_executor(tmp_path / "submitit")
    line = runner.submission_error(sbatch_says)
    assert "\n" not in line and line.startswith("Slurm refused the jobs") and all(f in line for f in fragments), line


def test_max_requeues_is_submitits_time_out_requeue_limit(tmp_path):
    pytest.importorskip("submitit")
    from lnsgd.sweep import SubmititExecutor, SubmititOptions

    ex = SubmititExecutor(SubmititOptions(cluster="local", max_requeues=7)).make_executor(tmp_path / "submitit")
    assert ex._executor.max_num_timeout == 7  # what submitit counts time-limit requeues against
    assert "--max-requeues" in invoke("sweep", "--help").output


def test_a_repeated_submitit_warning_is_said_once_and_a_new_one_still_shows(caplog):
    import logging

    from lnsgd.sweep.slurm import OncePerMessage

    logger = logging.getLogger("submitit")
    once = OncePerMessage()
    logger.addFilter(once)
    try:
        with caplog.at_level(logging.WARNING, logger="submitit"):
            for call in (1, 2, 3):
                logger.warning(f"Call #{call} - Bypassing sacct error Command '['sacct']' returned 1, status may be inaccurate.")
            logger.warning("Call #4 - Bypassing sacct error Command '['sacct']' returned 2, status may be inaccurate.")
    finally:
        logger.removeFilter(once)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "returned 1" in said[0] and "returned 2" in said[1], said


def test_submitit_missing_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    line = one_line_error(invoke("sweep", write_tiny(tmp_path), "--grid", "seed=0,1", "--executor", "submitit"))
    assert "pip install submitit" in line and "lnsgd[slurm]" in line
    assert not (tmp_path / "runs" / "tiny-seed").exists()


def test_bad_sweep_spec_files(tmp_path):
    write_tiny(tmp_path)
    spec = tmp_path / "s.sweep"
    spec.write_text("recipe: recipe.yaml\ngrid: {seed: [0, 1]}\nepochs: 3\n")
    assert "epochs: unknown key" in one_line_error(invoke("sweep", spec))
    spec.write_text("recipe: missing.yaml\ngrid: {seed: [0, 1]}\n")
    assert "does not exist" in one_line_error(invoke("sweep", spec))
    spec.write_text("recipe: recipe.yaml\ngrid: {optim.lr: [0.1, abc]}\n")
    assert "optim.lr" in one_line_error(invoke("sweep", spec))
    assert "no sweep.json" in one_line_error(invoke("sweep-status", tmp_path))


# --------------------------------------------------------------------------- process executor end to end


@pytest.fixture(scope="module")
def process_sweep(tmp_path_factory):
    """A 2×2 sweep through the process executor with --jobs 2 (run once for the module)."""
    root = tmp_path_factory.mktemp("process")
    recipe = write_tiny(root)
    res = invoke("sweep", recipe, *GRID, "--jobs", "2")
    return root, recipe, res


def test_process_sweep_runs_every_point(process_sweep):
    root, _, res = process_sweep
    assert res.exit_code == 0, res.output
    sweep_dir = root / "runs" / "tiny-lr-seed"
    data = read_sweep(sweep_dir)
    assert [p["id"] for p in data["points"]] == IDS and all(p["status"] == "done" for p in data["points"])
    assert data["grid"] == {"optim.lr": [0.05, 0.1], "seed": [0, 1]} and data["recipe"] == str(root / "recipe.yaml")
    assert data["points"][2]["overrides"] == ["optim.lr=0.1", "seed=0"]
    for pid in IDS:
        run = sweep_dir / pid
        assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]
        assert "lnsgd train" in (run / "train.log").read_text()
        assert json.loads((run / "summary.json").read_text())["name"] == f"tiny-lr-seed/{pid}"
    # Each point is exactly the run `lnsgd train` makes with the same overrides (here: in-process).
    r = load_recipe(root / "recipe.yaml", ["optim.lr=0.1", "seed=1"])
    train(r, root / "ref")
    assert same_weights(weights(root / "ref/final.pt"), weights(sweep_dir / "lr=0.1,seed=1/final.pt"))
    assert "lr=0.1,seed=1" in res.output and "done" in res.output


def test_rerunning_a_finished_sweep_skips_every_run_and_status_shows_them(process_sweep):
    root, recipe, _ = process_sweep
    sweep_dir = root / "runs" / "tiny-lr-seed"
    before = {pid: (sweep_dir / pid / "final.pt").stat().st_mtime_ns for pid in IDS}
    res = invoke("sweep", recipe, *GRID, "--jobs", "2")
    assert res.exit_code == 0, res.output
    assert res.output.count("skip") == 4
    assert {pid: (sweep_dir / pid / "final.pt").stat().st_mtime_ns for pid in IDS} == before
    res = invoke("sweep-status", sweep_dir)
    assert res.exit_code == 0 and "4 done" in res.output and "2/2" in res.output and "lr=0.1,seed=1" in res.output
    rows = json.loads(invoke("sweep-status", sweep_dir, "--json").output)
    last = read_jsonl(sweep_dir / IDS[0] / "metrics.jsonl")[-1]
    assert rows[0]["test/acc"] == last["test/acc"] and rows[0]["epoch"] == 2 and rows[0]["status"] == "done"
    # The sweep folder alone continues the sweep as it was built.
    res = invoke("sweep", sweep_dir)
    assert res.exit_code == 0 and res.output.count("skip") == 4
    res = invoke("sweep", recipe, *GRID, "--dry-run")
    assert res.exit_code == 0 and res.output.count("skip (done)") == 4
    # One sweep folder, one sweep at a time.
    from lnsgd.sweep import sweep_lock

    with sweep_lock(sweep_dir):
        assert "already running" in one_line_error(invoke("sweep", recipe, *GRID))


def test_a_run_folder_is_not_taken_for_a_sweep(tmp_path):
    recipe = write_tiny(tmp_path)
    (tmp_path / "runs" / "tiny-seed").mkdir(parents=True)
    (tmp_path / "runs" / "tiny-seed" / "recipe.yaml").write_text("name: tiny-seed\n")
    line = one_line_error(invoke("sweep", recipe, "--grid", "seed=0,1"))
    assert "run folder, not a sweep" in line and "--name" in line


# --------------------------------------------------------------------------- interruption and exact continuation


# Long enough that a run is still training when the tests below stop it (60 epochs of this model take 1 s).
LONG_EPOCHS = 400
LONG = {"train": {"epochs": LONG_EPOCHS, "checkpoint_every": 1000}}  # last.pt only when stopped (or at the end)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted run the interrupted ones must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(write_tiny(root, LONG), ["seed=0"])
    train(recipe, root / "ref")
    return root / "ref"


def on_sweep_event(monkeypatch, hook):
    """Call ``hook(kind, point id, info)`` after each event the process executor reports: in the
    sweep's main thread, inside its loop, while its signal handlers are in place."""
    run = ProcessExecutor.run

    def run_with_hook(self, plan, tasks, update, event):
        def event_then_hook(kind, pid, info):
            event(kind, pid, info)
            hook(kind, pid, info)

        return run(self, plan, tasks, update, event_then_hook)

    monkeypatch.setattr(ProcessExecutor, "run", run_with_hook)


def _when(condition, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_interrupted_sweep_continues_exactly_and_a_failed_run_does_not_stop_the_others(tmp_path, long_reference, monkeypatch):
    recipe = write_tiny(tmp_path, LONG)
    # Two points at once: one trains for a while, the other fails at once (batch larger than the data).
    args = ("sweep", recipe, "--grid", "optim.batch_size=32,500", "--grid", "seed=0", "--jobs", "2")
    sweep_dir = tmp_path / "runs" / "tiny-batch_size-seed"
    long_run = sweep_dir / "batch_size=32,seed=0"

    def stop_when_training(kind, pid, info):  # Ctrl-C to the sweep after the failure and a few epochs of the long run
        if (kind, pid) == ("finished", "batch_size=500,seed=0"):
            assert info["status"] == "failed" and read_sweep(sweep_dir)["points"][1]["status"] == "failed"
            # The long run only gets further while we wait: the signal comes from this thread, mid-sweep.
            assert _when(lambda: len(read_jsonl(long_run / "metrics.jsonl")) >= 3), "the long run never started training"
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        on_sweep_event(m, stop_when_training)
        res = invoke(*args)
    assert res.exit_code == 130, res.output
    assert "continue with: lnsgd sweep" in res.output and "--grid optim.batch_size=32,500" in res.output
    points = {p["id"]: p for p in read_sweep(sweep_dir)["points"]}
    assert points["batch_size=32,seed=0"]["status"] == "interrupted"
    assert points["batch_size=500,seed=0"]["status"] == "failed"
    assert "larger than the training set" in points["batch_size=500,seed=0"]["error"]
    ckpt = torch.load(long_run / "checkpoints/last.pt", weights_only=True)
    assert 0 < ckpt["epoch"] < LONG_EPOCHS, "the child should have checkpointed mid-run on the forwarded SIGTERM"
    assert "SIGTERM" in (long_run / "train.log").read_text()

    res = invoke(*args)  # the same command continues: resumes one, retries the failed one
    assert res.exit_code == 1, res.output
    assert "1 of 2 runs failed" in one_line_error(res)
    points = {p["id"]: p for p in read_sweep(sweep_dir)["points"]}
    assert points["batch_size=32,seed=0"]["status"] == "done" and points["batch_size=32,seed=0"]["resumed"] is True
    assert same_weights(weights(long_reference / "final.pt"), weights(long_run / "final.pt"))
    ref_rows, rows = read_jsonl(long_reference / "metrics.jsonl"), read_jsonl(long_run / "metrics.jsonl")
    assert strip_timing(ref_rows) == strip_timing(rows)


def test_submitit_job_checkpoints_on_preemption_and_the_requeued_job_resumes_exactly(tmp_path, long_reference, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from lnsgd.sweep import PointJob

    assert isinstance(PointJob, type) and issubclass(PointJob, submitit.helpers.Checkpointable)
    recipe = load_recipe(write_tiny(tmp_path, LONG), ["seed=0"])
    job = PointJob(recipe_to_dict(recipe), str(tmp_path / "run"))
    requeued = []

    class Requeued(Exception):
        pass

    def submitit_handler(signum, frame):  # what submitit does on SIGUSR2: checkpoint(), requeue, exit
        requeued.append(job.checkpoint())
        raise Requeued

    def preempt_at_epoch_3(recipe):  # stands in for lnsgd.sharpness.training_hook: called at each evaluation, in the loop
        def hook(model, data, phase, epoch):
            if epoch == 3:
                os.kill(os.getpid(), signal.SIGUSR2)  # from the training loop itself: it is mid-run, by construction
            return {}

        return hook

    old = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with monkeypatch.context() as m, pytest.raises(Requeued):
            m.setattr("lnsgd.sharpness.training_hook", preempt_at_epoch_3)
            job()
    finally:
        signal.signal(signal.SIGUSR2, old)
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert 0 < ckpt["epoch"] < LONG_EPOCHS  # written on the signal: checkpoint_every would not have written it yet
    (delayed,) = requeued
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job
    delayed.result()  # the requeued job
    assert same_weights(weights(long_reference / "final.pt"), weights(tmp_path / "run/final.pt"))
    assert strip_timing(read_jsonl(long_reference / "metrics.jsonl")) == strip_timing(read_jsonl(tmp_path / "run/metrics.jsonl"))


def test_submitit_job_tracks_sharpness_like_lnsgd_train(tmp_path):
    """A point job trains in-process, so it must attach the same sharpness hook as `lnsgd train`."""
    pytest.importorskip("submitit")
    from lnsgd.sweep import PointJob

    extra = {"model": {"width": 8}, "track": {"sharpness": {"every": 1, "examples": 50, "hvps": 8}}}
    recipe = load_recipe(write_tiny(tmp_path, extra), ["seed=0"])
    PointJob(recipe_to_dict(recipe), str(tmp_path / "run"))()
    rows = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["sharp/trace_hessian"] is not None for r in rows)


# --------------------------------------------------------------------------- submitit executor end to end


def test_submitit_local_sweep_matches_the_process_sweep(tmp_path, process_sweep):
    # Two of the process sweep's points, paired with --zip: a job array of 2 on submitit's local backend.
    pytest.importorskip("submitit")
    recipe = write_tiny(tmp_path)
    args = ("sweep", recipe, *GRID, "--zip", "--executor", "submitit", "--cluster", "local", "--timeout-min", "10")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    sweep_dir = tmp_path / "runs" / "tiny-lr-seed-zip"
    data = read_sweep(sweep_dir)
    assert [p["id"] for p in data["points"]] == [IDS[0], IDS[3]] and data["zip"] is True
    assert all(p["status"] == "done" and p["job_id"] for p in data["points"]) and data["executor"] == "submitit"
    assert any((sweep_dir / "submitit").rglob("*.out"))
    proc_dir = process_sweep[0] / "runs" / "tiny-lr-seed"
    for pid in (IDS[0], IDS[3]):
        assert same_weights(weights(proc_dir / pid / "final.pt"), weights(sweep_dir / pid / "final.pt"))
        a, b = read_jsonl(proc_dir / pid / "metrics.jsonl"), read_jsonl(sweep_dir / pid / "metrics.jsonl")
        assert strip_timing(a) == strip_timing(b)
    res = invoke(*args)
    assert res.exit_code == 0 and res.output.count("skip") == 2


def test_a_different_grid_or_recipe_is_refused_unless_forced(process_sweep):
    root, recipe, _ = process_sweep
    line = one_line_error(invoke("sweep", recipe, "--grid", "optim.lr=0.05", "--grid", "seed=0,1"))
    assert "was not built from this recipe and grid" in line and "--force" in line and "optim.lr=0.05,0.1" in line
    line = one_line_error(invoke("sweep", recipe, *GRID, "noise.p=0.3"))
    assert "noise.p" in line
    # --force with a smaller grid keeps the runs it shares and deletes the others (runs last:
    # the submitit test compares with the process sweep's runs).
    res = invoke("sweep", recipe, "--grid", "optim.lr=0.05", "--grid", "seed=0,1", "--force")
    assert res.exit_code == 0, res.output
    sweep_dir = root / "runs" / "tiny-lr-seed"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == IDS[:2]
    assert [p["id"] for p in read_sweep(sweep_dir)["points"]] == IDS[:2]
