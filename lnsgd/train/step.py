"""The training step: one function from "batch b of this epoch" to updated parameters.

Everything a step does happens in ``TrainStep._step``, on tensors whose addresses
never change: gather the batch by its index in the epoch's permutation, apply the
pre-drawn augmentation and label noise, normalize, forward, loss, gradient
(``torch.func.grad``, which dynamo traces; ``loss.backward()`` it does not), gradient
norm, device-side accumulators, the optimizer update with the learning rate read from
a device tensor, and the batch counter. With ``compile: default`` the whole function
is one ``torch.compile(fullgraph=True)`` graph; with ``cuda-graphs`` it is also
captured as a CUDA graph ("reduce-overhead") and replayed: one launch per step.

What the graph cannot hold runs once per epoch, outside it (``start_epoch``): the
permutation, the label noise and augmentation draws (dynamo cannot trace an explicit
``torch.Generator``, and exact resume needs those generators) and the epoch's
learning rates. They are copied into the step's fixed buffers. Nothing in a step
synchronizes with the host.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from lnsgd.errors import LnsgdError
from lnsgd.noise import draw_noise, noisy_targets
from lnsgd.recipe import NoiseConfig

COMPILE_MODES = ("off", "default", "cuda-graphs")


@dataclass
class TrainSet:
    """The examples SGD steps over: ``n`` of them, fetched by an index tensor on the device.

    ``fetch_raw(idx)`` gives (inputs as stored — uint8 images or float features —,
    loss-ready clean targets); ``normalize`` turns stored inputs into model inputs.
    Augmentation acts between the two, on raw pixels, as torchvision's transforms do.
    ``tensors`` are the large tensors ``fetch_raw`` reads (a CUDA graph must not copy them).
    The adversarial initialization swaps in a replicated, relabelled set through this interface.
    """

    n: int
    fetch_raw: Callable[[Tensor], tuple[Tensor, Tensor]]
    normalize: Callable[[Tensor], Tensor]
    labels: Callable[[Tensor], Tensor]  # idx -> integer labels (for accuracy) or targets
    name: str = "train"
    tensors: tuple[Tensor, ...] = field(default=(), repr=False)

    def fetch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.fetch_raw(idx)
        return self.normalize(x), y


def new_accumulators(device: torch.device) -> dict[str, Tensor]:
    z = lambda dtype: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
    return {"noisy_loss": z(torch.float64), "grad_norm": z(torch.float64), "steps": z(torch.int64),
            "bad": z(torch.bool), "ok_before_bad": z(torch.int64)}  # fmt: skip


def accumulate(accum: dict[str, Tensor], loss: Tensor, gnorm: Tensor) -> None:
    """Device-side running sums, in place; the loop reads them once per evaluation."""
    accum["bad"] |= ~torch.isfinite(loss)
    accum["ok_before_bad"] += (~accum["bad"]).long()
    accum["noisy_loss"] += loss.double()
    accum["grad_norm"] += gnorm.double()
    accum["steps"] += 1


def global_norm(tensors) -> Tensor:
    """‖(t₁, …, t_k)‖₂ over a list of tensors."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast with fp32 master weights, or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def tf32_allowed(allowed: bool):
    """TF32 matmuls and convolutions on or off inside the block; the process's settings come back after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_compile_mode(mode: str, device: torch.device) -> None:
    if mode not in COMPILE_MODES:
        raise LnsgdError(f"compile={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "cuda-graphs" and device.type != "cuda":
        raise LnsgdError("compile=cuda-graphs needs a CUDA device; use compile=off (or compile=default) on a CPU")


class TrainStep:
    """Minibatch steps of (label-noise) SGD on ``train_set``; see the module docstring.

    Call ``start_epoch`` once per epoch, then ``step()`` once per batch. ``accum`` holds
    the running sums since the last ``reset_accumulators``.
    """

    def __init__(self, model: nn.Module, train_set: TrainSet, loss_fn, noise: NoiseConfig, num_classes: int, optimizer, *,
                 batch_size: int, steps_per_epoch: int, precision: str = "fp32", compile_mode: str = "off",
                 augment=None, device: torch.device) -> None:  # fmt: skip
        check_compile_mode(compile_mode, device)
        self.model, self.train_set, self.loss_fn, self.noise = model, train_set, loss_fn, noise
        self.num_classes, self.optimizer, self.augment = num_classes, optimizer, augment
        self.B, self.spe, self.precision, self.device = batch_size, steps_per_epoch, precision, device
        self.params = optimizer.params
        # Fixed-address inputs of the step, refilled by start_epoch.
        self.perm = torch.zeros(train_set.n, dtype=torch.int64, device=device)
        self.lrs = torch.zeros(steps_per_epoch, dtype=torch.float32, device=device)
        self.batch = torch.zeros((), dtype=torch.int64, device=device)
        self.offsets = torch.arange(batch_size, device=device)
        self.noise_draw: dict[str, Tensor] | None = None
        self.augment_draw: dict[str, Tensor] | None = None
        self.accum = new_accumulators(device)
        self.target_shape = self._target_shape()  # per example: () for labels, (k,) for regression targets
        self.compile_mode = compile_mode
        self._static_marked = False
        self._run = self._step
        if compile_mode != "off":
            self._run = torch.compile(self._step, fullgraph=True, mode="reduce-overhead" if compile_mode == "cuda-graphs" else None)

    # ----------------------------------------------------------------- once per epoch, outside the graph

    def start_epoch(self, perm: Tensor, noise_gen: torch.Generator, augment_gen: torch.Generator | None,
                    lrs: list[float], first_batch: int = 0) -> None:  # fmt: skip
        """Load the epoch's order, noise, augmentation and learning rates; the next step is batch ``first_batch``."""
        self.perm.copy_(perm)
        self.lrs.copy_(torch.tensor(lrs, dtype=torch.float32))
        self.batch.fill_(first_batch)
        draw = draw_noise(self.noise, (self.spe, self.B, *self.target_shape), self.num_classes, noise_gen, self.device)
        self.noise_draw = _refill(self.noise_draw, draw)
        if self.augment is not None:
            self.augment_draw = _refill(self.augment_draw, self.augment.draw(self.spe, self.B, augment_gen, self.device))
        if self.compile_mode == "cuda-graphs" and not self._static_marked:
            self._mark_static()

    def reset_accumulators(self) -> None:
        for t in self.accum.values():
            t.zero_()

    def step(self) -> None:
        self._run()

    # ----------------------------------------------------------------- the step (compiled whole)

    def _step(self) -> None:
        b = self.batch
        idx = self.perm.index_select(0, b * self.B + self.offsets)
        x, y = self.train_set.fetch_raw(idx)
        if self.augment is not None:
            x = self.augment.apply(x, {k: _row(v, b) for k, v in self.augment_draw.items()})
        x = self.train_set.normalize(x)
        y = noisy_targets(self.noise, y, {k: _row(v, b) for k, v in self.noise_draw.items()}, self.num_classes)
        grads, loss = self._gradient(x, y)
        accumulate(self.accum, loss.detach(), global_norm(grads.values()))
        self.optimizer.update(grads, _row(self.lrs, b))
        self.batch += 1

    def _gradient(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        if self.compile_mode == "off":
            # Eager: plain autograd on the module's own parameters, the same numbers without
            # torch.func's per-call wrapping (which cost 30% of a step on the demo's CNN).
            with autocast_for(self.precision, self.device):
                loss = self.loss_fn(self.model(x), y)
            return dict(zip(self.params, torch.autograd.grad(loss, list(self.params.values())))), loss
        return grad_and_value(self._loss)({k: p.detach() for k, p in self.params.items()}, x, y)

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # Buffers (BatchNorm running statistics) are passed as themselves and updated in place.
        with autocast_for(self.precision, self.device):
            out = functional_call(self.model, {**dict(self.model.named_buffers()), **params}, (x,))
        return self.loss_fn(out, y)

    # ----------------------------------------------------------------- full-batch gradient descent

    def full_batch_step(self, lr: float, chunk_size: int, noise_gen: torch.Generator) -> None:
        """One exact gradient step on the mean loss over the whole set, accumulated in chunks (eager)."""
        from lnsgd.noise import apply_noise

        n = self.train_set.n
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        grads = {k: torch.zeros_like(p) for k, p in self.params.items()}
        for start in range(0, n, chunk_size):
            idx = torch.arange(start, min(start + chunk_size, n), device=self.device)
            x, y = self.train_set.fetch(idx)
            y = apply_noise(self.noise, y, self.num_classes, noise_gen)
            g, loss = self._gradient(x, y)
            w = len(idx) / n
            for k in grads:
                grads[k].add_(g[k], alpha=w)
            total += loss.detach().double() * w
        accumulate(self.accum, total, global_norm(grads.values()))
        self.optimizer.update(grads, torch.tensor(lr, device=self.device))

    # ----------------------------------------------------------------- helpers

    def _target_shape(self) -> tuple[int, ...]:
        _, y = self.train_set.fetch_raw(torch.zeros(1, dtype=torch.int64, device=self.device))
        return tuple(y.shape[1:])

    def _mark_static(self) -> None:
        # CUDA graphs copy every non-static input into their own buffers at each replay; the
        # dataset (150 MB for CIFAR-10) and the state the step updates in place must not be
        # copied. Marking their addresses static is how torch's compiled-optimizer tutorial
        # does it for learning-rate tensors.
        mark = torch._dynamo.mark_static_address
        for t in (self.perm, self.lrs, self.batch, self.offsets, *self.train_set.tensors, *self.accum.values(),
                  *self.optimizer.state_tensors(), *(self.noise_draw or {}).values(), *(self.augment_draw or {}).values()):  # fmt: skip
            mark(t)
        self._static_marked = True


class CropFlip:
    """``data.augment: crop_flip`` for the step: draws an epoch of (top, left, flip) at once, applies one row per step."""

    padding = 4

    def draw(self, steps: int, batch_size: int, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        from lnsgd.data import crop_flip_params

        top, left, flip = crop_flip_params(steps * batch_size, generator, self.padding, device)
        shape = (steps, batch_size)
        return {"top": top.view(shape), "left": left.view(shape), "flip": flip.view(shape)}

    def apply(self, x: Tensor, draw: dict[str, Tensor]) -> Tensor:
        from lnsgd.data import crop_flip_at

        return crop_flip_at(x, draw["top"], draw["left"], draw["flip"], self.padding)


def make_augment(kind: str):
    """The augmentation object of ``data.augment``, or None."""
    return CropFlip() if kind == "crop_flip" else None


def _row(t: Tensor, b: Tensor) -> Tensor:
    """Row ``b`` (a 0-d device tensor) of ``t``, without a host sync."""
    return t.index_select(0, b.view(1)).squeeze(0)


def _refill(own: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy ``new`` into the tensors of ``own`` (same addresses, for CUDA graphs); allocate them the first time."""
    if own is None or own.keys() != new.keys() or any(own[k].shape != new[k].shape for k in new):
        return new
    for k, v in new.items():
        own[k].copy_(v)
    return own
