"""The training step: optimizer updates against torch.optim, the whole step compiled, bf16, resume, device handling."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lnsgd.errors import LnsgdError
from lnsgd.recipe import load_recipe
from lnsgd.track import read_jsonl
from lnsgd.train import train
from lnsgd.train.optim import SGD, Adam

from .conftest import interrupt_at_epoch, one_line_error, same_weights, strip_timing, weights


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("kind", ["sgd", "sgd-momentum", "sgd-fused", "sgd-momentum-fused", "adam"])
def test_optimizer_updates_match_torch_optim(kind):
    ours, ref = _net(), _net()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = dict(ours.named_parameters())
    if kind == "adam":
        opt, torch_opt = Adam(params, weight_decay=0.01), torch.optim.Adam(ref.parameters(), lr=0.05, weight_decay=0.01)
    else:
        beta = 0.9 if "momentum" in kind else 0.0
        # "fused": the multi-tensor kernel eager CUDA steps use, here on the CPU.
        opt = SGD(params, momentum=beta, weight_decay=0.01, fused=kind.endswith("fused"))
        torch_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=beta, weight_decay=0.01)
    lr = torch.tensor(0.05, dtype=torch.float64)
    for _ in range(25):
        loss = nn.functional.cross_entropy(ours(x), y)
        opt.update(dict(zip(params, torch.autograd.grad(loss, list(params.values())))), lr)
        torch_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        torch_opt.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), name


def test_sgd_is_fused_on_cuda_only():
    assert not SGD(dict(_net().named_parameters()), momentum=0.9).fused  # CPU: the per-tensor code
    meta = nn.Linear(3, 2, device="meta")
    assert not SGD(dict(meta.named_parameters())).fused
    if torch.cuda.is_available():
        assert SGD(dict(nn.Linear(3, 2).cuda().named_parameters()), momentum=0.9).fused


def test_optimizer_state_round_trips():
    net = _net()
    opt = SGD(dict(net.named_parameters()), momentum=0.9)
    for buf in opt.buffers.values():
        buf.normal_()
    state = opt.state_dict()
    fresh = SGD(dict(net.named_parameters()), momentum=0.9)
    addresses = [b.data_ptr() for b in fresh.buffers.values()]
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.buffers.values(), opt.buffers.values()))
    assert [b.data_ptr() for b in fresh.buffers.values()] == addresses  # loaded in place: CUDA graphs keep their pointers
    with pytest.raises(LnsgdError, match="optimizer state"):
        Adam(dict(net.named_parameters())).load_state_dict(state)


# A GroupNorm conv net, like ResNet18-GN. (A GroupNorm MLP normalizes groups of 4 scalars, whose tiny
# variances amplify rounding: there compiled and eager drift apart by 1e-3 in 48 steps, as any reordering of sums would.)
COMPILED = {"compile": "default", "model": {"name": "cnn", "width": 8, "norm": "groupnorm", "group_size": 4},
            "optim": {"lr": 0.05, "momentum": 0.9},
            "train": {"epochs": 8, "eval_every": 4, "checkpoint_every": 4}}  # fmt: skip


def test_compiled_step_is_one_graph_and_matches_eager(write_recipe, tmp_path):
    """50 steps (8 epochs × 6 batches = 48, plus evaluation) compiled with fullgraph=True against eager."""
    import torch._dynamo

    torch._dynamo.reset()
    # fullgraph=True turns any graph break into an error, so finishing the run proves there is none.
    compiled = train(load_recipe(write_recipe(COMPILED)), tmp_path / "compiled")
    eager = train(load_recipe(write_recipe({**COMPILED, "compile": "off"})), tmp_path / "eager")
    a, b = weights(tmp_path / "compiled/final.pt"), weights(tmp_path / "eager/final.pt")
    assert compiled["steps"] == eager["steps"] == 48
    # Inductor fuses and reorders float32 sums; measured on this model the largest weight difference
    # is 3e-8 after 6 steps and 3e-7 after 48 (weights ~1).
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k
    assert compiled["final"]["train/loss"] == pytest.approx(eager["final"]["train/loss"], rel=1e-5)


def test_compiled_run_resumes_where_an_uninterrupted_one_ends(write_recipe, tmp_path):
    from lnsgd.errors import RunInterrupted

    recipe = load_recipe(write_recipe(COMPILED))
    train(recipe, tmp_path / "a")
    with pytest.raises(RunInterrupted):
        train(recipe, tmp_path / "b", progress=interrupt_at_epoch(4))
    assert torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["epoch"] == 4
    train(recipe, tmp_path / "b", resume=True)
    assert same_weights(weights(tmp_path / "a/final.pt"), weights(tmp_path / "b/final.pt"))
    assert strip_timing(read_jsonl(tmp_path / "a/metrics.jsonl")) == strip_timing(read_jsonl(tmp_path / "b/metrics.jsonl"))


def test_bf16_autocast_trains_close_to_fp32(write_recipe, tmp_path):
    """200 steps of a small MLP: bf16 autocast (fp32 master weights) ends within a few percent of fp32's loss."""
    extra = {"noise": {"kind": "none", "p": 0.0}, "data": {"train_size": 640}, "model": {"width": 64},
             "optim": {"lr": 0.05, "batch_size": 32}, "train": {"epochs": 10, "eval_every": 10, "checkpoint_every": 10}}  # fmt: skip
    fp32 = train(load_recipe(write_recipe(extra)), tmp_path / "fp32")
    bf16 = train(load_recipe(write_recipe({**extra, "precision": "bf16"})), tmp_path / "bf16")
    assert fp32["steps"] == bf16["steps"] == 200
    start = read_jsonl(tmp_path / "fp32/metrics.jsonl")[0]["train/loss"]
    assert fp32["final"]["train/loss"] < 0.5 * start  # it trained
    assert bf16["final"]["train/loss"] == pytest.approx(fp32["final"]["train/loss"], rel=0.05)
    assert not same_weights(weights(tmp_path / "fp32/final.pt"), weights(tmp_path / "bf16/final.pt"))  # bf16 really ran


def test_resume_reads_the_checkpoint_on_the_cpu(write_recipe, tmp_path, monkeypatch):
    """Generator states must stay CPU ByteTensors: a checkpoint read onto a GPU would hand set_state CUDA tensors."""
    import lnsgd.train.loop

    recipe = load_recipe(write_recipe({"train": {"epochs": 1}}))
    train(recipe, tmp_path / "r")
    seen = []
    real = lnsgd.train.loop.read_checkpoint

    def spy(path, map_location="cpu"):
        seen.append(map_location)
        return real(path, map_location)

    monkeypatch.setattr(lnsgd.train.loop, "read_checkpoint", spy)
    train(load_recipe(write_recipe({"train": {"epochs": 2}})), tmp_path / "r", resume=True)
    assert seen and all(isinstance(loc, str) and loc == "cpu" for loc in seen), seen


def test_resume_does_not_need_the_init_checkpoint(write_recipe, tmp_path, cli):
    assert cli("train", write_recipe({"name": "first", "train": {"epochs": 1}}), "--quiet").exit_code == 0
    init = tmp_path / "init.pt"
    (tmp_path / "runs/first/final.pt").rename(init)
    path = write_recipe({"train": {"epochs": 2}, "init": {"checkpoint": str(init)}})
    assert cli("train", path, "--quiet").exit_code == 0
    init.unlink()  # moved or deleted after the run started
    res = cli("train", path, "train.epochs=3", "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in read_jsonl(tmp_path / "runs/tiny/metrics.jsonl")] == [0, 1, 2, 3]


def test_resume_on_another_device_type_is_refused(write_recipe, tmp_path, cli):
    path = write_recipe({"train": {"epochs": 1}})
    assert cli("train", path, "--quiet").exit_code == 0
    last = tmp_path / "runs/tiny/checkpoints/last.pt"
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "device_type": "cuda"}, last)
    before = last.read_bytes()
    line = one_line_error(cli("train", path, "train.epochs=2", "--resume", "--quiet"))
    assert "written on cuda" in line and "device=cuda" in line and "exact" in line
    assert last.read_bytes() == before


def test_out_of_memory_in_a_step_is_one_line_and_keeps_the_checkpoint(write_recipe, tmp_path, cli, monkeypatch):
    from lnsgd.train import step

    calls = {"n": 0}
    real = step.TrainStep.step

    def oom_after_two_epochs(self):
        calls["n"] += 1
        if calls["n"] > 2 * 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)

    monkeypatch.setattr(step.TrainStep, "step", oom_after_two_epochs)
    line = one_line_error(cli("train", write_recipe({"train": {"epochs": 4}}), "--quiet"))
    assert "out of memory" in line and "optim.batch_size" in line and "last.pt (epoch 2)" in line
    last = tmp_path / "runs/tiny/checkpoints/last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert not list(last.parent.glob("*.tmp"))


@pytest.mark.parametrize("value", ["off", "default", "cuda-graphs"])
def test_every_compile_value_survives_bare_yaml(tmp_path, value):
    path = tmp_path / "r.yaml"
    path.write_text(f"compile: {value}\n")  # YAML 1.1 reads a bare `off` as false
    assert load_recipe(path).compile == value
    assert load_recipe(tmp_path / "r.yaml", [f"compile={value}"]).compile == value


def test_bench_times_the_training_step(cli, tmp_path):
    """lnsgd bench's own side is lnsgd.train.step.TrainStep, and explicit flags are honoured on a CPU."""
    if torch.cuda.is_available():
        pytest.skip("the GPU figures come from benchmarks/gpu_check.py")
    out = tmp_path / "bench.json"
    res = cli("bench", "--batch-size", "16", "--steps", "3", "--no-epoch", "--json", out)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["config"]["batch_size"] == 16 and r["config"]["steps"] == 3
    assert "batch 16, 3 steps" in res.output


@pytest.mark.parametrize("extra", [{"noise": {"kind": "smooth", "p": 0.2}}, {"data": {"augment": "crop_flip"}}],
                         ids=["smooth", "crop_flip"])  # fmt: skip
def test_smooth_and_crop_flip_runs_resume_exactly(write_recipe, tmp_path, extra):
    """Stopped mid-epoch and resumed, a run ends bit-identical to an uninterrupted one (augmentation has its own stream)."""
    import dataclasses
    import os
    import signal

    from lnsgd.data import load
    from lnsgd.errors import RunInterrupted
    from lnsgd.train import Phase
    from lnsgd.train.loop import plain_train_set

    recipe = load_recipe(write_recipe({**extra, "optim": {"momentum": 0.5}, "train": {"epochs": 3}}))
    full = train(recipe, tmp_path / "a")
    base = plain_train_set(load(recipe), recipe.loss)
    calls = {"n": 0}

    def fetch_raw(idx):  # SIGINT during batch 4 of epoch 2
        calls["n"] += len(idx) == 32
        if calls["n"] == 6 + 4:
            os.kill(os.getpid(), signal.SIGINT)
        return base.fetch_raw(idx)

    with pytest.raises(RunInterrupted):
        train(recipe, tmp_path / "b", phases=[Phase("train", recipe, train_set=dataclasses.replace(base, fetch_raw=fetch_raw))])
    assert torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["batch"] == 4
    train(recipe, tmp_path / "b", resume=True)
    assert same_weights(weights(tmp_path / "a/final.pt"), weights(tmp_path / "b/final.pt"))
    rows = read_jsonl(tmp_path / "a/metrics.jsonl")
    assert strip_timing(rows) == strip_timing(read_jsonl(tmp_path / "b/metrics.jsonl"))
    assert all(r["train/expected_loss_gap"] >= 0 for r in rows)
    if recipe.noise.kind == "smooth":
        assert full["final"]["lambda_eff"] == 0.0
        # Trained on the smoothed loss itself: the gap to its minimum falls.
        assert rows[-1]["train/expected_loss_gap"] < rows[0]["train/expected_loss_gap"]
    else:  # augmentation changes the trajectory
        plain = train(load_recipe(write_recipe({"optim": {"momentum": 0.5}, "train": {"epochs": 3}})), tmp_path / "plain")
        assert plain["final"]["train/loss"] != full["final"]["train/loss"]
