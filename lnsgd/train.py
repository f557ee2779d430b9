"""The training loop: label-noise (or plain) SGD from a recipe, resumable exactly.

Read top to bottom: set up the device and data, build or load the model, then for
each epoch draw a permutation on the device, step through minibatches with fresh
label noise, and every ``eval_every`` epochs hand one row of metrics to the sink.
Checkpoints hold every generator state, so a run stopped anywhere — at an epoch
boundary or mid-epoch by SIGINT/SIGTERM — continues bit-for-bit (on the same
device and software).

Nothing here reads globals or the command line: the recipe, the run folder and the
progress display are passed in.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lnsgd import __version__
from lnsgd.checkpoint import load_state_strict, read_checkpoint, save_atomic
from lnsgd.data import Data, load
from lnsgd.errors import DivergedError, LnsgdError, RunInterrupted
from lnsgd.losses import clean_loss, expected_loss
from lnsgd.models import DataSpec, build_model
from lnsgd.noise import apply_noise
from lnsgd.recipe import RESUME_TOLERATED, Recipe, lambda_eff, lr_at, recipe_differences, recipe_to_dict, recipe_to_yaml, steps_per_epoch
from lnsgd.track import MetricsSink, Progress, read_jsonl, truncate_jsonl

# --------------------------------------------------------------------------- set-up helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LnsgdError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


def configure_backend(recipe: Recipe, device: torch.device) -> None:
    """Process-wide numeric settings the recipe asks for."""
    if device.type == "cpu":
        # Near zero loss, denormal floats made plain SGD ~100x slower in a prototype.
        torch.set_flush_denormal(True)
    tf32 = recipe.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast_context(recipe: Recipe, device: torch.device):
    """bf16 autocast with fp32 master weights, or nothing."""
    if recipe.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def compile_model(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The module the training step calls: eager, ``torch.compile``, or compile with CUDA graphs.

    The original module keeps the parameters (checkpoints save its state_dict); the
    compiled wrapper shares them. CUDA graphs ("reduce-overhead") need static shapes:
    the loop drops the last partial batch, so every step has the same shape.
    """
    if mode == "off":
        return model
    if mode == "cuda-graphs" and device.type != "cuda":
        raise LnsgdError("compile=cuda-graphs needs a CUDA device; use compile=off (or compile=default) on a CPU")
    return torch.compile(model, mode="reduce-overhead" if mode == "cuda-graphs" else "default")


def stream_seed(seed: int, stream: str) -> int:
    """Independent, reproducible seeds for each random stream of a run."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_model(recipe: Recipe, spec: DataSpec, device: torch.device) -> nn.Module:
    """The recipe's model, initialized from the recipe's seed, or loaded from init.checkpoint."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(recipe.seed, "init"))
        model = build_model(recipe.model, spec)
    if recipe.init.checkpoint is not None:
        ckpt = read_checkpoint(recipe.init.checkpoint)
        load_state_strict(model, ckpt["model"], f"init.checkpoint {recipe.init.checkpoint}")
    return model.to(device)


def model_targets(data: Data, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """What the loss compares outputs with: labels for cross-entropy; one-hot or raw targets for mse."""
    if loss == "mse" and data.is_classification:
        return nn.functional.one_hot(labels, data.num_classes).to(torch.float32)
    return labels


@dataclass
class TrainSet:
    """The examples SGD steps over: ``n`` of them, fetched by index tensor on the device.

    ``fetch(idx)`` returns (normalized inputs, loss-ready clean targets). The adversarial
    initialization swaps in a replicated, relabelled set through this same interface.
    """

    n: int
    fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    labels: Callable[[torch.Tensor], torch.Tensor]  # idx -> integer labels (for accuracy) or targets
    name: str = "train"


def plain_train_set(data: Data, loss: str, split: str = "train") -> TrainSet:
    x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
    return TrainSet(
        n=len(x),
        fetch=lambda idx: (data.normalize(x[idx]), model_targets(data, y[idx], loss)),
        labels=lambda idx: y[idx],
        name=split,
    )


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TrainSet, loss_fn, expected_fn, batch_size: int, classification: bool, autocast) -> dict:
    """Loss, accuracy and expected loss over a whole set, in large batches, one host sync at the end."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    exp_sum = torch.zeros_like(loss_sum)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, dataset.n, batch_size):
        idx = torch.arange(start, min(start + batch_size, dataset.n), device=device)
        x, y = dataset.fetch(idx)
        with autocast:
            out = model(x)
        out = out.float()
        loss_sum += loss_fn(out, y).double() * len(idx)
        exp_sum += expected_fn(out, y).double() * len(idx)
        if classification:
            correct += (out.argmax(-1) == dataset.labels(idx)).sum()
    model.train(was_training)
    values = torch.stack([loss_sum / dataset.n, exp_sum / dataset.n, correct.double() / dataset.n]).tolist()
    result = {"loss": values[0], "expected_loss": values[1]}
    if classification:
        result["acc"] = values[2]
    return result


def weight_norm(model: nn.Module) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in model.parameters()]))


def grad_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


# --------------------------------------------------------------------------- run folder


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Create the run folder, refusing to overwrite an existing run unless asked."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not resume and not force:
        raise LnsgdError(
            f"run folder {run_dir} already exists; pass --resume to continue it, --force to overwrite it, "
            "or choose another name=<...>"
        )
    if resume and not (run_dir / "checkpoints" / "last.pt").exists():
        raise LnsgdError(f"nothing to resume in {run_dir} (no checkpoints/last.pt); run without --resume")
    try:
        if exists and force and not resume:
            shutil.rmtree(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise LnsgdError(f"cannot write run folder {run_dir} ({e.strerror or e}); set log.dir to a writable folder") from None


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


# --------------------------------------------------------------------------- stop signals


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes the current step, checkpoints and stops."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C while checkpointing: give up at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal is not None


# --------------------------------------------------------------------------- the loop


@dataclass
class Phase:
    """One stretch of training with its own set, epochs and stop rule (train has one; inits have more)."""

    name: str
    recipe: Recipe  # the recipe this phase trains with (noise, optim, epochs)
    train_set: TrainSet | None = None  # default: the dataset's training set
    stop_rule: Callable[[dict], bool] | None = None  # row -> stop early
    optimizer: str = "sgd"  # or "adam" (the adversarial init's memorize phase)
    extra_row: dict = field(default_factory=dict)


def build_optimizer(kind: str, model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def train(
    recipe: Recipe,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    phases: list[Phase] | Callable[[Data], list[Phase]] | None = None,
    sharpness_hook: Callable | None = None,
    command: str = "train",
) -> dict:
    """Run ``recipe`` into ``run_dir`` (default ``<log.dir>/<name>``) and return its summary.

    ``phases`` lets the init commands chain stretches of training in one run folder;
    ``lnsgd train`` uses a single phase with the recipe as given.
    """
    run_dir = run_dir_for(recipe, run_dir)
    progress = progress or Progress()
    device = resolve_device(recipe.device)
    configure_backend(recipe, device)
    autocast = autocast_context(recipe, device)
    data = load(recipe, device)
    phases = phases(data) if callable(phases) else (phases or [Phase("train", recipe)])
    for ph in phases:
        _check_batch_size(ph.recipe, ph.train_set.n if ph.train_set else len(data.train_x))

    # Everything that can fail on bad input (init.checkpoint, compile mode) comes before the run folder exists.
    model = make_model(recipe, data.spec, device)
    forward = compile_model(model, recipe.compile, device)  # the training step's view of the model
    prepare_run_dir(run_dir, resume=resume, force=force)

    # Where we are: the phase, epochs done in it, batches done in the current epoch, the global step.
    state = {"phase": 0, "epoch": 0, "batch": 0, "step": 0, "time_s": 0.0, "wandb_id": None, "phase_done": False,
             "stopped_early": False}  # fmt: skip
    perm_gen = torch.Generator(device=device)
    noise_gen = torch.Generator(device=device)
    perm_gen.manual_seed(stream_seed(recipe.seed, "perm"))
    noise_gen.manual_seed(stream_seed(recipe.seed, "noise"))
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    resumed = None
    if resume:
        resumed = read_checkpoint(ckpt_path, map_location=device)
        diffs = [f"{key}: {was!r} → {now!r}"
                 for key, was, now in recipe_differences(recipe_to_dict(recipe), resumed["recipe"], RESUME_TOLERATED)]  # fmt: skip
        if diffs:
            raise LnsgdError(
                f"--resume with a recipe that differs from the run's ({'; '.join(diffs[:3])}); "
                f"resume with the recipe in {run_dir / 'recipe.yaml'} or start a new run"
            )
        load_state_strict(model, resumed["model"], f"checkpoint {ckpt_path}")
        state.update({k: resumed[k] for k in state})
        perm_gen.set_state(resumed["perm_state"])
        noise_gen.set_state(resumed["noise_state"])
        # Rows logged after the checkpoint belong to work that will be redone.
        position = (state["phase"], state["epoch"])
        truncate_jsonl(run_dir / "metrics.jsonl", lambda r: _row_position(r, phases) <= position)
        p = phases[state["phase"]]
        if state["phase_done"] and (state["stopped_early"] or state["epoch"] >= p.recipe.train.epochs):
            state.update(phase=state["phase"] + 1, epoch=0, batch=0, phase_done=False, stopped_early=False)
            resumed = None  # the next phase starts with a fresh optimizer
        else:
            state["phase_done"] = False  # e.g. train.epochs was raised: keep going
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))

    sink = MetricsSink(run_dir, recipe.log.wandb, recipe.name, recipe_to_dict(recipe), state["wandb_id"])
    if sink.wandb is not None:
        state["wandb_id"] = sink.wandb.run_id
    rows = read_jsonl(run_dir / "metrics.jsonl")
    last_row: dict = rows[-1] if rows else {}
    stop = StopFlag()
    started = time.perf_counter() - state["time_s"]
    phase_results: dict[str, dict] = {}

    def elapsed() -> float:
        return time.perf_counter() - started

    def checkpoint(optimizer, accum, perm_state) -> None:
        state["time_s"] = elapsed()
        save_atomic(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "recipe": recipe_to_dict(recipe),
             "data_spec": data.spec.to_dict(), **state, "perm_state": perm_state.cpu(),
             "noise_state": noise_gen.get_state().cpu(), "accum": {k: v.cpu() for k, v in accum.items()}},
            ckpt_path,
        )  # fmt: skip

    try:
        with stop:
            for phase_index in range(state["phase"], len(phases)):
                phase = phases[phase_index]
                precipe = phase.recipe
                train_set = phase.train_set or plain_train_set(data, recipe.loss)
                test_set = plain_train_set(data, recipe.loss, split="test")
                loss_fn = clean_loss(recipe.loss)
                exp_fn = expected_loss(recipe.loss, precipe.noise.kind, precipe.noise.p, precipe.noise.sigma, data.num_classes)
                optimizer = build_optimizer(phase.optimizer, model, precipe)
                spe = steps_per_epoch(precipe, train_set.n)
                continuing = resumed is not None and phase_index == state["phase"]
                if continuing:
                    optimizer.load_state_dict(resumed["optimizer"])
                    accum = {k: v.to(device) for k, v in resumed["accum"].items()}
                else:
                    accum = _new_accumulators(device)
                    state.update(phase=phase_index, epoch=0, batch=0, phase_done=False, stopped_early=False)

                def make_row(epoch: int, imgs_per_s: float | None) -> dict:
                    bs = recipe.train.eval_batch_size
                    train_m = evaluate(model, train_set, loss_fn, exp_fn, bs, data.is_classification, autocast)
                    test_m = evaluate(model, test_set, loss_fn, exp_fn, bs, data.is_classification, autocast)
                    sums = torch.stack([accum["noisy_loss"], accum["grad_norm"], accum["steps"].double()]).tolist()
                    n_steps = sums[2]
                    row = {
                        "epoch": epoch, "step": state["step"], "time_s": round(elapsed(), 3),
                        "lr": lr_at(precipe, max(state["step"] - 1, 0), spe), "lambda_eff": lambda_eff(precipe),
                        "train/loss": train_m["loss"], "train/acc": train_m.get("acc"),
                        "train/expected_loss": train_m["expected_loss"],
                        "test/loss": test_m["loss"], "test/acc": test_m.get("acc"),
                        "train/noisy_loss": sums[0] / n_steps if n_steps else None,
                        "grad/norm": sums[1] / n_steps if n_steps else None,
                        "weight/norm": weight_norm(model).item(),
                        "throughput/img_per_s": imgs_per_s,
                    }  # fmt: skip
                    if precipe.noise.kind == "flip":
                        row["noise/p"] = precipe.noise.p
                    if len(phases) > 1:
                        row["phase"] = phase.name
                    row.update(phase.extra_row)
                    if sharpness_hook is not None:
                        row.update(sharpness_hook(model, data, phase.name, epoch) or {})
                    return row

                progress.start(precipe.train.epochs, state["epoch"], phase.name if len(phases) > 1 else recipe.name)
                if not continuing:
                    last_row = make_row(0, None)
                    sink.log(last_row)
                    progress.advance(0, _progress_info(last_row))
                    if phase.stop_rule is not None and phase.stop_rule(last_row):
                        state.update(phase_done=True, stopped_early=True)
                        checkpoint(optimizer, accum, perm_gen.get_state())

                while not state["phase_done"] and state["epoch"] < precipe.train.epochs:
                    epoch = state["epoch"]
                    epoch_start_time = time.perf_counter()
                    perm_state = perm_gen.get_state()  # redrawing from here reproduces this epoch's order
                    examples = 0
                    model.train()
                    if precipe.optim.full_batch:
                        if stop:
                            checkpoint(optimizer, accum, perm_state)
                            raise RunInterrupted(_interrupt_message(stop.signal, run_dir, epoch, state["step"]))
                        _set_lr(optimizer, lr_at(precipe, state["step"], spe))
                        _full_batch_step(model, optimizer, train_set, precipe, loss_fn, data.num_classes, noise_gen, accum, autocast)
                        state["step"] += 1
                        examples += train_set.n
                    else:
                        perm = torch.randperm(train_set.n, generator=perm_gen, device=device)
                        B = precipe.optim.batch_size
                        for b in range(state["batch"], spe):
                            if stop:  # finish nothing half-done: checkpoint between steps
                                state["batch"] = b
                                checkpoint(optimizer, accum, perm_state)
                                raise RunInterrupted(_interrupt_message(stop.signal, run_dir, epoch, state["step"]))
                            idx = perm[b * B : (b + 1) * B]
                            x, y = train_set.fetch(idx)
                            y = apply_noise(precipe.noise, y, data.num_classes, noise_gen)
                            _set_lr(optimizer, lr_at(precipe, state["step"], spe))
                            optimizer.zero_grad(set_to_none=True)
                            with autocast:
                                loss = loss_fn(forward(x), y)
                            loss.backward()
                            _accumulate(accum, loss.detach(), grad_norm(model))
                            optimizer.step()
                            state["step"] += 1
                            examples += len(idx)

                    # One host sync per epoch: did any step produce a non-finite loss?
                    if bool(accum["bad"].item()):
                        first_bad = state["step"] - int(accum["steps"].item()) + int(accum["ok_before_bad"].item())
                        good = read_checkpoint(ckpt_path).get("epoch") if ckpt_path.exists() else None
                        where = f"{ckpt_path} (epoch {good})" if good is not None else "none (no checkpoint was written yet)"
                        raise DivergedError(
                            f"training loss became non-finite at step {first_bad} (epoch {epoch + 1}); "
                            f"last good checkpoint: {where}; lower optim.lr or check the data"
                        )
                    epoch_time = time.perf_counter() - epoch_start_time
                    state.update(epoch=epoch + 1, batch=0)
                    finished = state["epoch"] == precipe.train.epochs
                    if state["epoch"] % precipe.train.eval_every == 0 or finished:
                        last_row = make_row(state["epoch"], examples / epoch_time if epoch_time > 0 else None)
                        sink.log(last_row)
                        accum = _new_accumulators(device)
                        if phase.stop_rule is not None and phase.stop_rule(last_row):
                            state.update(phase_done=True, stopped_early=True)
                    state["phase_done"] = state["phase_done"] or finished
                    progress.advance(state["epoch"], _progress_info(last_row))
                    if state["epoch"] % precipe.train.checkpoint_every == 0 or state["phase_done"] or stop:
                        checkpoint(optimizer, accum, perm_gen.get_state())
                    if stop:
                        raise RunInterrupted(_interrupt_message(stop.signal, run_dir, state["epoch"], state["step"]))
                progress.stop()
                phase_results[phase.name] = {"stopped_early": state["stopped_early"], "epochs": state["epoch"],
                                             "steps": state["step"], "final": last_row}  # fmt: skip
                resumed = None
    finally:
        progress.stop()
        sink.close()

    save_atomic({"model": model.state_dict(), "recipe": recipe_to_dict(recipe), "data_spec": data.spec.to_dict(),
                 "epoch": state["epoch"], "step": state["step"], "phase": state["phase"]}, run_dir / "final.pt")  # fmt: skip
    summary = {
        "name": recipe.name, "command": command, "run_dir": str(run_dir), "final": last_row,
        "epochs": state["epoch"], "steps": state["step"], "wall_time_s": round(elapsed(), 3),
        "phases": {k: {kk: vv for kk, vv in v.items() if kk != "final"} for k, v in phase_results.items()},
        "environment": environment_info(device),
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# --------------------------------------------------------------------------- loop pieces


def _check_batch_size(recipe: Recipe, n: int) -> None:
    if not recipe.optim.full_batch and recipe.optim.batch_size > n:
        raise LnsgdError(
            f"optim.batch_size={recipe.optim.batch_size} is larger than the training set ({n} examples); "
            "lower it or set optim.full_batch=true"
        )


def _new_accumulators(device: torch.device) -> dict:
    z = lambda dtype: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
    return {"noisy_loss": z(torch.float64), "grad_norm": z(torch.float64), "steps": z(torch.int64),
            "bad": z(torch.bool), "ok_before_bad": z(torch.int64)}  # fmt: skip


def _accumulate(accum: dict, loss: torch.Tensor, gnorm: torch.Tensor) -> None:
    """Device-side running sums; no host sync inside a step."""
    finite = torch.isfinite(loss)
    accum["bad"] |= ~finite
    accum["ok_before_bad"] += (~accum["bad"]).long()
    accum["noisy_loss"] += loss.double()
    accum["grad_norm"] += gnorm.double()
    accum["steps"] += 1


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def _full_batch_step(model, optimizer, train_set, recipe, loss_fn, num_classes, noise_gen, accum, autocast) -> None:
    """One exact gradient step on the mean loss over the whole set, accumulated in chunks."""
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float64)
    chunk = recipe.optim.chunk_size
    for start in range(0, train_set.n, chunk):
        idx = torch.arange(start, min(start + chunk, train_set.n), device=device)
        x, y = train_set.fetch(idx)
        y = apply_noise(recipe.noise, y, num_classes, noise_gen)
        with autocast:
            loss = loss_fn(model(x), y) * (len(idx) / train_set.n)
        loss.backward()
        total += loss.detach().double()
    _accumulate(accum, total, grad_norm(model))
    optimizer.step()


def _row_position(row: dict, phases: list[Phase]) -> tuple[int, int]:
    names = [p.name for p in phases]
    phase = names.index(row["phase"]) if row.get("phase") in names else 0
    return phase, int(row.get("epoch", 0))


def _progress_info(row: dict) -> dict:
    info = {}
    for key, label in (("train/loss", "loss"), ("train/acc", "train"), ("test/acc", "test")):
        if row.get(key) is not None:
            info[label] = row[key]
    return info


def _interrupt_message(signum: int | None, run_dir: Path, epoch: int, step: int) -> str:
    name = signal.Signals(signum).name if signum else "signal"
    ckpt = run_dir / "checkpoints" / "last.pt"
    return f"stopped by {name} at step {step} (epoch {epoch}); checkpoint written to {ckpt}; continue with --resume"
