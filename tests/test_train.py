"""The training loop end to end: outputs, exact resume, signals, divergence, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import lnsgd
from lnsgd.errors import RunInterrupted
from lnsgd.recipe import load_recipe
from lnsgd.track import read_jsonl
from lnsgd.train import Phase, train
from lnsgd.train.loop import plain_train_set

from .conftest import interrupt_at_epoch, one_line_error, same_weights, strip_timing, weights


def test_train_cli_writes_a_complete_run_folder(cli, write_recipe, tmp_path):
    res = cli("train", write_recipe(), "--quiet")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "final.pt", "checkpoints/last.pt"):
        assert (run / name).exists(), name
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    names = {"epoch", "step", "time_s", "lr", "lambda_eff", "train/loss", "train/acc", "train/expected_loss", "test/loss",
             "test/acc", "train/noisy_loss", "grad/norm", "weight/norm", "throughput/img_per_s"}  # fmt: skip
    assert names <= rows[-1].keys()
    assert rows[-1]["step"] == 3 * (200 // 32)
    assert rows[-1]["lambda_eff"] == pytest.approx(0.1 / 32)
    # Flip noise: the expected loss is the label-smoothed CE, above the clean CE once the model is confident.
    assert rows[-1]["train/expected_loss"] > rows[-1]["train/loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["test/acc"] == rows[-1]["test/acc"] and summary["environment"]["torch"] == torch.__version__
    # The stored recipe reproduces the run's recipe.
    assert load_recipe(run / "recipe.yaml") == load_recipe(write_recipe())


def test_expected_loss_matches_hand_computed_smoothing():
    from lnsgd.losses import SmoothedCrossEntropy

    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)[0]
    p = 0.3
    # (1−p)·CE(y=0) + p/2·(CE(1) + CE(2))
    expected = -(0.7 * logp[0] + 0.15 * logp[1] + 0.15 * logp[2])
    assert SmoothedCrossEntropy(p, 3)(logits, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-6)


def test_resume_after_half_the_epochs_is_identical(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe({"optim": {"momentum": 0.9}, "train": {"epochs": 4}}))
    train(recipe, tmp_path / "a")

    with pytest.raises(RunInterrupted, match="--resume"):
        train(recipe, tmp_path / "b", progress=interrupt_at_epoch(2))
    assert torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["epoch"] == 2
    train(recipe, tmp_path / "b", resume=True)
    assert same_weights(weights(tmp_path / "a/final.pt"), weights(tmp_path / "b/final.pt"))
    assert strip_timing(read_jsonl(tmp_path / "a/metrics.jsonl")) == strip_timing(read_jsonl(tmp_path / "b/metrics.jsonl"))


def test_resume_mid_epoch_is_identical(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe({"optim": {"momentum": 0.5}, "train": {"epochs": 2}}))
    train(recipe, tmp_path / "a")

    from lnsgd.data import load

    data = load(recipe)
    base = plain_train_set(data, recipe.loss)
    calls = {"n": 0}

    def fetch_raw(idx):  # send SIGINT while fetching batch 3 of 6 in epoch 2; the loop stops before batch 4
        calls["n"] += len(idx) == 32  # count training batches, not evaluation passes
        if calls["n"] == 6 + 3:
            os.kill(os.getpid(), signal.SIGINT)
        return base.fetch_raw(idx)

    killing = Phase("train", recipe, train_set=dataclasses.replace(base, fetch_raw=fetch_raw))
    with pytest.raises(RunInterrupted):
        train(recipe, tmp_path / "b", phases=[killing])
    ckpt = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 3)
    train(recipe, tmp_path / "b", resume=True)
    assert same_weights(weights(tmp_path / "a/final.pt"), weights(tmp_path / "b/final.pt"))
    assert strip_timing(read_jsonl(tmp_path / "a/metrics.jsonl")) == strip_timing(read_jsonl(tmp_path / "b/metrics.jsonl"))


def test_sigterm_checkpoints_and_says_how_to_resume(write_recipe, tmp_path):
    # A real `lnsgd train` process that sends itself SIGTERM when epoch 2 is reported:
    # the signal lands at a known point of the loop, with no polling race.
    path = write_recipe({"train": {"epochs": 500}, "data": {"train_size": 1000}})
    child = (
        "import os, signal, sys\n"
        "import lnsgd.track as track\n"
        "def advance(self, epoch, info):\n"
        "    if epoch == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "track.Progress.advance = advance\n"
        "from lnsgd.cli import main\n"
        "sys.argv = ['lnsgd', 'train', sys.argv[1], '--quiet']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "SIGTERM" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = torch.load(tmp_path / "runs/tiny/checkpoints/last.pt", weights_only=True)
    assert ckpt["step"] > 0 and ckpt["epoch"] == 2
    assert len(read_jsonl(tmp_path / "runs/tiny/metrics.jsonl")) == 3  # epochs 0, 1, 2


def test_full_batch_step_is_the_exact_gradient(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe({"noise": {"kind": "none", "p": 0.0}, "optim": {"full_batch": True, "chunk_size": 64, "lr": 0.5},
                                       "train": {"epochs": 1}}))  # fmt: skip
    train(recipe, tmp_path / "fb")
    from lnsgd.data import load
    from lnsgd.train.loop import make_model

    data = load(recipe)
    model = make_model(recipe, data.spec, torch.device("cpu"))
    loss = torch.nn.functional.cross_entropy(model(data.normalize(data.train_x)), data.train_y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = {k: p.detach() - 0.5 * g for (k, p), g in zip(model.named_parameters(), grads)}
    got = weights(tmp_path / "fb/final.pt")
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)


def test_load_checkpoint_api(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe({"train": {"epochs": 1}}))
    train(recipe, tmp_path / "r")
    model, stored = lnsgd.load_checkpoint(tmp_path / "r/final.pt")
    assert stored == recipe and not model.training
    assert same_weights(model.state_dict(), weights(tmp_path / "r/final.pt"))


def test_init_checkpoint_starts_from_those_weights(write_recipe, tmp_path, cli):
    assert cli("train", write_recipe({"name": "first", "train": {"epochs": 1}}), "--quiet").exit_code == 0
    ck = tmp_path / "runs/first/final.pt"
    res = cli("train", write_recipe({"name": "second", "train": {"epochs": 1}, "init": {"checkpoint": str(ck)}}), "--quiet")
    assert res.exit_code == 0, res.output
    first = read_jsonl(tmp_path / "runs/first/metrics.jsonl")
    second = read_jsonl(tmp_path / "runs/second/metrics.jsonl")
    assert second[0]["train/loss"] == pytest.approx(first[-1]["train/loss"], rel=1e-6)


def test_divergence_stops_with_the_last_good_checkpoint(cli, write_recipe, tmp_path):
    # lr huge from epoch 2 on (step schedule with gamma > 1): epoch 1 is fine and checkpointed, then NaN.
    path = write_recipe({"optim": {"lr": 0.1, "schedule": {"kind": "step", "milestones": [1], "gamma": 1e12}},
                         "train": {"epochs": 5}})  # fmt: skip
    res = cli("train", path, "--quiet")
    assert res.exit_code == 3
    line = one_line_error(res)
    assert "non-finite" in line and "epoch 2" in line and "last.pt (epoch 1)" in line
    assert torch.load(tmp_path / "runs/tiny/checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "runs/tiny/final.pt").exists()


def test_existing_run_folder_is_not_overwritten(cli, write_recipe, tmp_path):
    path = write_recipe({"train": {"epochs": 1}})
    assert cli("train", path, "--quiet").exit_code == 0
    before = (tmp_path / "runs/tiny/metrics.jsonl").read_text()
    line = one_line_error(cli("train", path, "--quiet"))
    assert "already exists" in line and "--resume" in line and "--force" in line
    assert (tmp_path / "runs/tiny/metrics.jsonl").read_text() == before
    assert cli("train", path, "--quiet", "--force").exit_code == 0


def test_resume_extends_a_finished_run(cli, write_recipe, tmp_path):
    path = write_recipe({"train": {"epochs": 2}})
    assert cli("train", path, "--quiet").exit_code == 0
    assert cli("train", path, "train.epochs=3", "--resume", "--quiet").exit_code == 0
    assert [r["epoch"] for r in read_jsonl(tmp_path / "runs/tiny/metrics.jsonl")] == [0, 1, 2, 3]


def test_resume_refuses_a_different_recipe(cli, write_recipe, tmp_path):
    path = write_recipe({"train": {"epochs": 1}})
    assert cli("train", path, "--quiet").exit_code == 0
    line = one_line_error(cli("train", path, "optim.lr=0.3", "--resume", "--quiet"))
    assert "optim.lr" in line


@pytest.mark.parametrize(
    "extra, overrides, fragment",
    [
        ({}, ["optim.batch_size=5000"], "larger than the training set"),
        ({}, ["model.name=cnn", "model.norm=groupnorm", "model.group_size=5"], "does not divide"),
        ({}, ["data.name=mnist"], "not found under"),
        ({}, ["optim.lr=0"], "optim.lr"),
        ({}, ["noise.p=1.5"], "noise.p"),
        ({}, ["noise.sigma=-1"], "noise.sigma"),
        ({}, ["optim.lr"], "expected key=value"),
        ({"optim": {"lrate": 1}}, [], "unknown key"),
        ({}, ["optim.lr=abc"], "optim.lr"),
        ({}, ["init.checkpoint=/nonexistent/final.pt"], "does not exist"),
        ({}, ["device=cuda"] if not torch.cuda.is_available() else ["optim.lr=-1"], "cuda" if not torch.cuda.is_available() else "lr"),
    ],
)
def test_bad_input_is_one_clear_line(cli, write_recipe, tmp_path, extra, overrides, fragment):
    line = one_line_error(cli("train", write_recipe(extra), *overrides, "--quiet"))
    assert fragment in line


def test_bad_checkpoint_files(cli, write_recipe, tmp_path):
    trunc = tmp_path / "trunc.pt"
    assert cli("train", write_recipe({"name": "src", "train": {"epochs": 1}}), "--quiet").exit_code == 0
    data = (tmp_path / "runs/src/final.pt").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    notckpt = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, notckpt)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    for path, fragment in ((trunc, "truncated, corrupt"), (notckpt, "not an lnsgd checkpoint"), (text, "truncated, corrupt")):
        line = one_line_error(cli("train", write_recipe(), f"init.checkpoint={path}", "--quiet"))
        assert fragment in line and str(path) in line
        assert not (tmp_path / "runs" / "tiny").exists()  # a run that could not start leaves no folder behind


def test_architecture_mismatch_names_tensors(cli, write_recipe, tmp_path):
    assert cli("train", write_recipe({"name": "src", "train": {"epochs": 1}}), "--quiet").exit_code == 0
    ck = tmp_path / "runs/src/final.pt"
    line = one_line_error(cli("train", write_recipe(), f"init.checkpoint={ck}", "model.width=32", "--quiet"))
    assert "shape mismatch" in line and "net.1.weight" in line


def test_unwritable_log_dir(cli, write_recipe, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    line = one_line_error(cli("train", write_recipe(), f"log.dir={blocker}/sub", "--quiet"))
    assert "cannot write run folder" in line and "log.dir" in line


def test_wandb_offline_writes_a_local_run(write_recipe, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = load_recipe(write_recipe({"train": {"epochs": 1}, "log": {"wandb": {"mode": "offline"}}}))
    train(recipe, tmp_path / "w")
    assert list((tmp_path / "w/wandb").glob("offline-run-*")), "wandb offline should write a local run folder"


def test_wandb_online_failure_falls_back_and_never_kills_the_run(write_recipe, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    modes = []
    real_init = wandb.init

    def fake_init(mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise RuntimeError("network unreachable")
        return real_init(mode="disabled")

    monkeypatch.setattr(wandb, "init", fake_init)
    recipe = load_recipe(write_recipe({"train": {"epochs": 1}, "log": {"wandb": {"mode": "online"}}}))
    with pytest.warns(RuntimeWarning, match="continuing offline"):
        train(recipe, tmp_path / "w")
    assert modes == ["online", "offline"]
    assert (tmp_path / "w/summary.json").exists()


def test_commands_leave_process_wide_state_as_they_found_it(cli, write_recipe, tmp_path):
    # TF32 flags, the warning printer and torch's thread count belong to the caller's process.
    import warnings

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, warnings.showwarning)
    res = cli("train", write_recipe({"precision": "tf32", "train": {"epochs": 1}}), "--quiet")
    assert res.exit_code == 0, res.output
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, warnings.showwarning) == before
    threads = torch.get_num_threads()
    res = cli("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == threads


USAGE_ERRORS = [(["train"], "Missing argument 'recipe'"), (["train", "x.yaml", "--bogus"], "No such option: --bogus"),
                (["trian"], "No such command 'trian'")]


@pytest.mark.parametrize(("args", "says"), USAGE_ERRORS)
def test_usage_errors_are_one_line_with_exit_code_2(args, says, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lnsgd", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and says in proc.stderr, proc.stderr
    assert "--help" in proc.stderr


def test_repeated_sigterm_checkpoints_once_and_resumes_exactly(write_recipe, tmp_path):
    # A cluster may send SIGTERM more than once (requeue, preemption, then the job step's
    # own signal); only a second Ctrl-C means "give up now".
    from lnsgd.track import Progress

    class TwoSigterms(Progress):
        def advance(self, epoch, info):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    recipe = load_recipe(write_recipe({"train": {"epochs": 4}}))
    train(recipe, tmp_path / "a")
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        train(recipe, tmp_path / "b", progress=TwoSigterms())
    assert torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["epoch"] == 2
    train(recipe, tmp_path / "b", resume=True)
    assert same_weights(weights(tmp_path / "a/final.pt"), weights(tmp_path / "b/final.pt"))


def test_a_second_ctrl_c_still_gives_up_at_once():
    from lnsgd.runtime import StopFlag

    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
