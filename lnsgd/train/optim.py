"""Optimizers as updates of tensors the training step owns: SGD with heavy-ball momentum, and Adam.

Why not ``torch.optim``: the training step is one function compiled whole (gradient,
noise, accumulators *and* update in one graph, ``lnsgd.train.step``). Dynamo cannot trace
``loss.backward()``, so the step takes gradients with ``torch.func.grad``, and the
update has to be ordinary tensor code on the parameters and on state tensors whose
addresses never change (CUDA graphs replay on fixed addresses). The learning rate is
a device tensor, so a schedule changes a value, not the graph.

The updates follow ``torch.optim.SGD`` (dampening 0, no Nesterov) and
``torch.optim.Adam`` (no amsgrad) exactly as documented, and tests compare them with
those classes step by step:

    SGD:  g ← g + wd·θ;  b ← β·b + g;  θ ← θ − η·b          (b = g on the first step)
    Adam: g ← g + wd·θ;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
          θ ← θ − η/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd as functional_sgd  # public: torch.optim.sgd.__all__

from lnsgd.errors import LnsgdError


class SGD:
    """Heavy-ball SGD over ``named_params``; the momentum buffers live as long as the optimizer.

    Run eagerly on a CUDA device (``fused=None``, the default) the update is
    ``torch.optim.sgd.sgd(..., fused=True)``, PyTorch's public functional SGD: one
    multi-tensor kernel instead of three per parameter, with the learning rate read
    on the device (no host sync). Inside a compiled step the plain per-tensor code
    below is traced instead (inductor fuses it into the step's graph). On the CPU
    the per-tensor code runs, so CPU results do not depend on a kernel's rounding.
    """

    kind = "sgd"

    def __init__(
        self, named_params: dict[str, nn.Parameter], momentum: float = 0.0, weight_decay: float = 0.0, fused: bool | None = None
    ):
        self.params = named_params
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        # The first step's buffer is the gradient itself; starting from zeros gives β·0 + g = g exactly.
        self.buffers = {k: torch.zeros_like(p) for k, p in named_params.items()} if momentum else {}
        if fused is None:
            fused = bool(named_params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in named_params.values())
        self.fused = fused

    @torch.no_grad()
    def update(self, grads: dict[str, Tensor], lr: Tensor) -> None:
        if self.fused and not torch.compiler.is_compiling():
            names = list(self.params)
            functional_sgd(
                [self.params[k] for k in names],
                [grads[k] for k in names],
                [self.buffers[k] for k in names] if self.momentum else [None] * len(names),
                fused=True,
                lr=lr,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                dampening=0.0,
                nesterov=False,
                maximize=False,
            )
            return
        for name, p in self.params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = self.buffers[name]
                buf.mul_(self.momentum).add_(g)
                g = buf
            p.sub_(lr * g)

    def state_tensors(self) -> list[Tensor]:
        return list(self.buffers.values())

    def state_dict(self) -> dict:
        return {"kind": self.kind, "momentum_buffer": {k: v.detach().cpu() for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        _copy_into(self.buffers, state["momentum_buffer"], "momentum_buffer")


class Adam:
    """Adam (Kingma & Ba 2015) as ``torch.optim.Adam`` computes it, with a device-side step count."""

    kind = "adam"

    def __init__(self, named_params: dict[str, nn.Parameter], betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = named_params
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        first = next(iter(named_params.values()))
        self.t = torch.zeros((), device=first.device, dtype=torch.float64)  # bias corrections in float64
        self.exp_avg = {k: torch.zeros_like(p) for k, p in named_params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in named_params.items()}

    @torch.no_grad()
    def update(self, grads: dict[str, Tensor], lr: Tensor) -> None:
        self.t.add_(1)
        bias1 = 1 - self.beta1**self.t
        bias2_sqrt = (1 - self.beta2**self.t).sqrt()
        for name, p in self.params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * p
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            p.sub_((lr / bias1) * m / (v.sqrt() / bias2_sqrt + self.eps))

    def state_tensors(self) -> list[Tensor]:
        return [self.t, *self.exp_avg.values(), *self.exp_avg_sq.values()]

    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {"kind": self.kind, "step": self.t.detach().cpu(), "exp_avg": cpu(self.exp_avg), "exp_avg_sq": cpu(self.exp_avg_sq)}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        self.t.copy_(state["step"])
        _copy_into(self.exp_avg, state["exp_avg"], "exp_avg")
        _copy_into(self.exp_avg_sq, state["exp_avg_sq"], "exp_avg_sq")


def build_optimizer(kind: str, model: nn.Module, momentum: float, weight_decay: float):
    """The optimizer of a training phase over the model's trainable parameters."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if kind == "adam":
        return Adam(params, weight_decay=weight_decay)
    return SGD(params, momentum=momentum, weight_decay=weight_decay)


def _check_kind(state: dict, kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise LnsgdError(
            f"checkpoint's optimizer state is {found!r}, this phase uses {kind!r}; resume with the recipe the run was started with"
        )


def _copy_into(own: dict[str, Tensor], saved: dict[str, Tensor], what: str) -> None:
    """Load saved state into the existing tensors (their addresses must not change: CUDA graphs hold them)."""
    if set(own) != set(saved):
        raise LnsgdError(
            f"checkpoint's optimizer {what} does not match the model's parameters; resume with the recipe the run was started with"
        )
    for k, t in own.items():
        t.copy_(saved[k])
