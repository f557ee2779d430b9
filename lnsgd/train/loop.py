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

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lnsgd.checkpoint import load_state_strict, read_checkpoint, require_keys, save_atomic
from lnsgd.data import Data, load, model_targets
from lnsgd.errors import DivergedError, LnsgdError, RunInterrupted
from lnsgd.losses import clean_loss, expected_loss, expected_loss_minimum, training_loss
from lnsgd.models import DataSpec, build_model
from lnsgd.recipe import RESUME_TOLERATED, Recipe, lambda_eff, lr_at, recipe_differences, recipe_to_dict, recipe_to_yaml, steps_per_epoch
from lnsgd.runtime import (
    RunLock,
    StopFlag,
    backend_settings,
    claim_folder,
    environment_info,
    resolve_device,
    run_dir_for,
    signal_name,
    stream_seed,
)
from lnsgd.track import DiskFull, MetricsSink, Progress, read_jsonl, truncate_jsonl, write_atomic
from lnsgd.train.optim import build_optimizer
from lnsgd.train.step import TrainSet, TrainStep, autocast_for, check_compile_mode, make_augment

# --------------------------------------------------------------------------- set-up helpers


def make_model(recipe: Recipe, spec: DataSpec, device: torch.device, *, load_init: bool = True) -> nn.Module:
    """The recipe's model, initialized from the recipe's seed, or loaded from init.checkpoint.

    ``load_init=False`` (a resumed run) skips init.checkpoint: the weights come from the
    run's own checkpoint, and the init file may since have moved or been deleted.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(recipe.seed, "init"))
        model = build_model(recipe.model, spec)
    if recipe.init.checkpoint is not None and load_init:
        ckpt = read_checkpoint(recipe.init.checkpoint)
        load_state_strict(model, ckpt["model"], f"init.checkpoint {recipe.init.checkpoint}")
    return model.to(device)


def plain_train_set(data: Data, loss: str, split: str = "train") -> TrainSet:
    x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
    return TrainSet(
        n=len(x),
        fetch_raw=lambda idx: (x[idx], model_targets(data, y[idx], loss)),
        normalize=data.normalize,
        labels=lambda idx: y[idx],
        name=split,
        tensors=(x, y, data.mean, data.std),
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


# --------------------------------------------------------------------------- the loop


@dataclass
class Phase:
    """One stretch of training with its own set, epochs and stop rule (train has one; inits have more)."""

    name: str
    recipe: Recipe  # the recipe this phase trains with (noise, optim, epochs)
    train_set: TrainSet | None = None  # default: the dataset's training set
    stop_rule: Callable[[dict], bool] | None = None  # row -> stop early
    optimizer: str = "sgd"  # or "adam" (the adversarial init's memorize phase)


@dataclass
class Position:
    """Where a run is: what a checkpoint must hold, besides tensors, to continue exactly."""

    phase: int = 0
    epoch: int = 0  # epochs done in the phase
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps done in the whole run
    time_s: float = 0.0
    wandb_id: str | None = None
    phase_done: bool = False
    stopped_early: bool = False


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
    device = resolve_device(recipe.device)
    check_compile_mode(recipe.compile, device)
    with backend_settings(recipe, device):
        return _train(recipe, run_dir, device, resume, force, progress, phases, sharpness_hook, command)


def _train(recipe, run_dir, device, resume, force, progress, phases, sharpness_hook, command) -> dict:
    data = load(recipe, device)
    phases = phases(data) if callable(phases) else (phases or [Phase("train", recipe)])
    for ph in phases:
        _check_batch_size(ph.recipe, ph.train_set.n if ph.train_set else len(data.train_x))
    # Everything that can fail on bad input (init.checkpoint, compile mode) comes before the run folder exists.
    model = make_model(recipe, data.spec, device, load_init=not resume)
    claim_folder(run_dir, resume=resume, force=force, make=["checkpoints"])
    with RunLock(run_dir):  # one writer for the run's lifetime
        return _run(recipe, run_dir, data, model, phases, device, resume, progress, sharpness_hook, command)


def _run(recipe, run_dir, data, model, phases, device, resume, progress, sharpness_hook, command) -> dict:
    run = Run(recipe, run_dir, data, model, phases, device, progress or Progress(), sharpness_hook)
    if resume:
        run.load_checkpoint()
    write_atomic(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    run.open_sink()
    try:
        with run.stop:
            # A finished phase is skipped: after load_checkpoint that is only a run trained to the end.
            for phase_index in range(run.pos.phase + run.pos.phase_done, len(phases)):
                run.train_phase(phase_index)
    except torch.OutOfMemoryError:
        raise LnsgdError(run.out_of_memory_message()) from None
    except DiskFull as e:  # a checkpoint or a metrics row did not fit: every file is as it was before the write
        raise DiskFull(f"{e}; last good checkpoint: {run.last_good_checkpoint()}; free space, then continue with --resume") from None
    finally:
        run.progress.stop()
        run.sink.close()
    try:
        return run.finish(command)
    except DiskFull as e:  # last.pt holds the finished run: --resume only writes final.pt and summary.json again
        raise DiskFull(f"{e}; the run is trained and checkpointed: free space, then continue with --resume") from None


class Run:
    """The state of one training run and the steps that advance it; ``train`` drives it."""

    def __init__(self, recipe, run_dir, data, model, phases, device, progress, sharpness_hook):
        self.recipe, self.run_dir, self.data, self.model, self.phases = recipe, run_dir, data, model, phases
        self.device, self.progress, self.sharpness_hook = device, progress, sharpness_hook
        self.pos = Position()
        self.ckpt_path = run_dir / "checkpoints" / "last.pt"
        # One generator per random stream; each epoch starts from a state the checkpoint stores.
        self.gens = {name: torch.Generator(device=device).manual_seed(stream_seed(recipe.seed, name))
                     for name in ("perm", "noise", "augment")}  # fmt: skip
        self.epoch_states = {k: g.get_state() for k, g in self.gens.items()}
        self.resumed: dict | None = None  # the checkpoint being continued, until its phase is set up
        self.stop = StopFlag()
        self.last_row: dict = {}
        self.phase_results: dict[str, dict] = {}
        self.where = "set-up"

    # ----------------------------------------------------------------- resume

    def load_checkpoint(self) -> None:
        """Continue from checkpoints/last.pt: read on the CPU, then moved onto the run's device."""
        ckpt = read_checkpoint(self.ckpt_path)  # generator states must stay CPU ByteTensors
        require_keys(ckpt, ("model", "optimizer", "accum", "recipe", *Position.__dataclass_fields__), self.ckpt_path, "--resume")
        diffs = [f"{key}: {was!r} → {now!r}"
                 for key, was, now in recipe_differences(recipe_to_dict(self.recipe), ckpt["recipe"], RESUME_TOLERATED)]  # fmt: skip
        if diffs:
            raise LnsgdError(
                f"--resume with a recipe that differs from the run's ({'; '.join(diffs[:3])}); "
                f"resume with the recipe in {self.run_dir / 'recipe.yaml'} or start a new run"
            )
        started_on = ckpt.get("device_type", "cpu")
        if started_on != self.device.type:
            raise LnsgdError(
                f"{self.ckpt_path} was written on {started_on} and this run is on {self.device.type}: generator streams "
                f"differ between device types, so the continuation could not be exact; resume with device={started_on}, "
                f"or start a new run from it with init.checkpoint={self.ckpt_path}"
            )
        load_state_strict(self.model, ckpt["model"], f"checkpoint {self.ckpt_path}")
        self.pos = Position(**{k: ckpt[k] for k in Position.__dataclass_fields__})
        for name, g in self.gens.items():
            if f"{name}_state" in ckpt:
                g.set_state(ckpt[f"{name}_state"])
        self.epoch_states = {k: g.get_state() for k, g in self.gens.items()}
        # Rows logged after the checkpoint belong to work that will be redone.
        position = (self.pos.phase, self.pos.epoch)
        truncate_jsonl(self.run_dir / "metrics.jsonl", lambda r: _row_position(r, self.phases) <= position)
        p = self.phases[self.pos.phase]
        if self.pos.phase_done and (self.pos.stopped_early or self.pos.epoch >= p.recipe.train.epochs):
            if self.pos.phase + 1 == len(self.phases):
                return  # trained to the end (final.pt or summary.json was not written): only finish() is left
            self.pos = Position(**{**self.pos.__dict__, "phase": self.pos.phase + 1, "epoch": 0, "batch": 0,
                                   "phase_done": False, "stopped_early": False})  # fmt: skip
            return  # the next phase starts with a fresh optimizer
        self.pos.phase_done = False  # e.g. train.epochs was raised: keep going
        self.resumed = ckpt

    def open_sink(self) -> None:
        self.sink = MetricsSink(self.run_dir, self.recipe.log.wandb, self.recipe.name, recipe_to_dict(self.recipe), self.pos.wandb_id)
        if self.sink.wandb is not None:
            self.pos.wandb_id = self.sink.wandb.run_id
        rows = read_jsonl(self.run_dir / "metrics.jsonl")
        self.last_row = rows[-1] if rows else {}
        self.started = time.perf_counter() - self.pos.time_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    # ----------------------------------------------------------------- one phase

    def train_phase(self, phase_index: int) -> None:
        phase = self.phases[phase_index]
        r, data = phase.recipe, self.data
        train_set = phase.train_set or plain_train_set(data, self.recipe.loss)
        self.train_set = train_set
        self.test_set = plain_train_set(data, self.recipe.loss, split="test")
        self.loss_fn = clean_loss(self.recipe.loss)
        self.expected_fn = expected_loss(self.recipe.loss, r.noise.kind, r.noise.p, r.noise.sigma, data.num_classes)
        self.expected_min = expected_loss_minimum(self.recipe.loss, r.noise.kind, r.noise.p, r.noise.sigma, data.num_classes)
        step_loss = training_loss(self.recipe.loss, r.noise.kind, r.noise.p, data.num_classes)  # smooth: the smoothed CE
        self.spe = steps_per_epoch(r, train_set.n)
        optimizer = build_optimizer(phase.optimizer, self.model, r.optim.momentum, r.optim.weight_decay)
        # Augmentation is of the dataset's own images; the adversarial replicas are never augmented.
        augment = make_augment(self.recipe.data.augment) if train_set.name == "train" else None
        self.step = TrainStep(self.model, train_set, step_loss, r.noise, data.num_classes, optimizer,
                              batch_size=r.optim.batch_size, steps_per_epoch=self.spe, precision=self.recipe.precision,
                              compile_mode=self.recipe.compile, augment=augment, device=self.device)  # fmt: skip
        continuing = self.resumed is not None and phase_index == self.pos.phase
        if continuing:
            optimizer.load_state_dict(self.resumed["optimizer"])
            for k, t in self.step.accum.items():
                t.copy_(self.resumed["accum"][k])
        else:
            self.pos.phase, self.pos.epoch, self.pos.batch, self.pos.phase_done, self.pos.stopped_early = phase_index, 0, 0, False, False
        self.resumed = None

        self.progress.start(r.train.epochs, self.pos.epoch, phase.name if len(self.phases) > 1 else self.recipe.name)
        if not continuing:
            self.log_row(phase, 0, None)
            self.progress.advance(0, _progress_info(self.last_row))
            if phase.stop_rule is not None and phase.stop_rule(self.last_row):
                self.pos.phase_done = self.pos.stopped_early = True
                self.checkpoint()
        while not self.pos.phase_done and self.pos.epoch < r.train.epochs:
            self.train_epoch(phase)
        self.progress.stop()
        self.phase_results[phase.name] = {"stopped_early": self.pos.stopped_early, "epochs": self.pos.epoch,
                                          "steps": self.pos.step, "final": self.last_row}  # fmt: skip

    def train_epoch(self, phase: Phase) -> None:
        r, pos, step = phase.recipe, self.pos, self.step
        epoch = pos.epoch
        started = time.perf_counter()
        # Redrawing from these states reproduces this epoch's order, noise and augmentation.
        self.epoch_states = {k: g.get_state() for k, g in self.gens.items()}
        self.model.train()
        self.where = "a training step"
        if r.optim.full_batch:
            self._stop_if_asked(epoch)
            step.full_batch_step(lr_at(r, pos.step, self.spe), r.optim.chunk_size, self.gens["noise"])
            pos.step += 1
            examples = self.train_set.n
        else:
            perm = torch.randperm(self.train_set.n, generator=self.gens["perm"], device=self.device)
            first_step = pos.step - pos.batch
            lrs = [lr_at(r, first_step + i, self.spe) for i in range(self.spe)]
            step.start_epoch(perm, self.gens["noise"], self.gens["augment"], lrs, first_batch=pos.batch)
            examples = 0
            for b in range(pos.batch, self.spe):
                pos.batch = b
                self._stop_if_asked(epoch)  # finish nothing half-done: checkpoint between steps
                step.step()
                pos.step += 1
                examples += r.optim.batch_size

        # One host sync per epoch: did any step produce a non-finite loss?
        accum = step.accum
        if bool(accum["bad"].item()):
            first_bad = pos.step - int(accum["steps"].item()) + int(accum["ok_before_bad"].item())
            raise DivergedError(
                f"training loss became non-finite at step {first_bad} (epoch {epoch + 1}); "
                f"last good checkpoint: {self.last_good_checkpoint()}; lower optim.lr or check the data"
            )
        epoch_time = time.perf_counter() - started
        pos.epoch, pos.batch = epoch + 1, 0
        self.epoch_states = {k: g.get_state() for k, g in self.gens.items()}
        finished = pos.epoch == r.train.epochs
        if pos.epoch % r.train.eval_every == 0 or finished:
            self.log_row(phase, pos.epoch, examples / epoch_time if epoch_time > 0 else None)
            step.reset_accumulators()
            if phase.stop_rule is not None and phase.stop_rule(self.last_row):
                pos.phase_done = pos.stopped_early = True
        pos.phase_done = pos.phase_done or finished
        self.progress.advance(pos.epoch, _progress_info(self.last_row))
        if pos.epoch % r.train.checkpoint_every == 0 or pos.phase_done or self.stop:
            self.checkpoint()
        if self.stop:
            raise RunInterrupted(_interrupt_message(self.stop.signal, self.run_dir, pos.epoch, pos.step))

    def _stop_if_asked(self, epoch: int) -> None:
        if self.stop:
            self.checkpoint()
            raise RunInterrupted(_interrupt_message(self.stop.signal, self.run_dir, epoch, self.pos.step))

    # ----------------------------------------------------------------- metrics and checkpoints

    def log_row(self, phase: Phase, epoch: int, imgs_per_s: float | None) -> None:
        r, data, accum = phase.recipe, self.data, self.step.accum
        bs = self.recipe.train.eval_batch_size
        autocast = autocast_for(self.recipe.precision, self.device)
        self.where = "evaluation"
        train_m = evaluate(self.model, self.train_set, self.loss_fn, self.expected_fn, bs, data.is_classification, autocast)
        test_m = evaluate(self.model, self.test_set, self.loss_fn, self.expected_fn, bs, data.is_classification, autocast)
        sums = torch.stack([accum["noisy_loss"], accum["grad_norm"], accum["steps"].double()]).tolist()
        n_steps = sums[2]
        row = {
            "epoch": epoch, "step": self.pos.step, "time_s": round(self.elapsed(), 3),
            "lr": lr_at(r, max(self.pos.step - 1, 0), self.spe), "lambda_eff": lambda_eff(r, self.train_set.n),
            "train/loss": train_m["loss"], "train/acc": train_m.get("acc"),
            "train/expected_loss": train_m["expected_loss"],
            # The distance to the manifold of expected-loss minimizers (the authors log the same).
            "train/expected_loss_gap": train_m["expected_loss"] - self.expected_min,
            "test/loss": test_m["loss"], "test/acc": test_m.get("acc"),
            "train/noisy_loss": sums[0] / n_steps if n_steps else None,
            "grad/norm": sums[1] / n_steps if n_steps else None,
            "weight/norm": weight_norm(self.model).item(),
            "throughput/img_per_s": imgs_per_s,
        }  # fmt: skip
        if r.noise.kind == "flip":
            row["noise/p"] = r.noise.p
        if len(self.phases) > 1:
            row["phase"] = phase.name
        if self.sharpness_hook is not None:
            self.where = "a sharpness measurement"
            row.update(self.sharpness_hook(self.model, data, phase.name, epoch) or {})
        self.sink.log(row)
        self.last_row = row

    def checkpoint(self) -> None:
        self.pos.time_s = self.elapsed()
        save_atomic(
            {"model": self.model.state_dict(), "optimizer": self.step.optimizer.state_dict(),
             "recipe": recipe_to_dict(self.recipe), "data_spec": self.data.spec.to_dict(), **self.pos.__dict__,
             **{f"{k}_state": v for k, v in self.epoch_states.items()}, "device_type": self.device.type,
             "accum": {k: v.cpu() for k, v in self.step.accum.items()}},
            self.ckpt_path,
        )  # fmt: skip

    def out_of_memory_message(self) -> str:
        r = self.phases[min(self.pos.phase, len(self.phases) - 1)].recipe
        fix = {
            "a training step": f"lower optim.batch_size (now {r.optim.batch_size})"
            + (f" or optim.chunk_size (now {r.optim.chunk_size})" if r.optim.full_batch else "")
            + ", or use precision=bf16",
            "evaluation": f"lower train.eval_batch_size (now {r.train.eval_batch_size})",
            "a sharpness measurement": "lower track.sharpness.examples or track.sharpness.hvps",
        }.get(self.where, "lower optim.batch_size or train.eval_batch_size")
        return (f"out of memory on {self.device} during {self.where} (epoch {self.pos.epoch + 1}): {fix}; "
                f"last good checkpoint: {self.last_good_checkpoint()}")  # fmt: skip

    def last_good_checkpoint(self) -> str:
        """What a failed run leaves to resume from, for its error line."""
        if not self.ckpt_path.exists():
            return "none (no checkpoint was written yet)"
        return f"{self.ckpt_path} (epoch {read_checkpoint(self.ckpt_path).get('epoch')})"

    def finish(self, command: str) -> dict:
        pos = self.pos
        save_atomic({"model": self.model.state_dict(), "recipe": recipe_to_dict(self.recipe), "data_spec": self.data.spec.to_dict(),
                     "epoch": pos.epoch, "step": pos.step, "phase": pos.phase}, self.run_dir / "final.pt")  # fmt: skip
        summary = {
            "name": self.recipe.name, "command": command, "run_dir": str(self.run_dir), "final": self.last_row,
            "epochs": pos.epoch, "steps": pos.step, "wall_time_s": round(self.elapsed(), 3),
            "phases": {k: {kk: vv for kk, vv in v.items() if kk != "final"} for k, v in self.phase_results.items()},
            "environment": environment_info(self.device),
        }  # fmt: skip
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        return summary


# --------------------------------------------------------------------------- loop pieces


def _check_batch_size(recipe: Recipe, n: int) -> None:
    if not recipe.optim.full_batch and recipe.optim.batch_size > n:
        raise LnsgdError(
            f"optim.batch_size={recipe.optim.batch_size} is larger than the training set ({n} examples); "
            "lower it or set optim.full_batch=true"
        )


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
    name = signal_name(signum)
    ckpt = run_dir / "checkpoints" / "last.pt"
    return f"stopped by {name} at step {step} (epoch {epoch}); checkpoint written to {ckpt}; continue with --resume"
