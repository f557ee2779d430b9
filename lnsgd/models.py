"""Networks. Pure modules: no I/O, no logging, no globals.

``build_model(config, spec)`` takes the input shape and output count from the
dataset (``DataSpec``). Models:

- ``resnet18``: the authors' model (adamian98/LabelNoiseFlatMinimizers, models.py):
  torchvision's ResNet18 (BasicBlock, [2, 2, 2, 2]; torchvision's parameter names
  and initialization) with the CIFAR stem (3×3 stride-1 first conv, no max-pool) and
  GroupNorm of ``group_size`` channels per group (default 32, as theirs), BatchNorm or
  no normalization. ``width`` scales every stage (64 → 64/128/256/512) so tests can
  use a tiny one.
- ``cnn``: a small conv net for 1-D signals (mnist1d) or images: conv k5, two conv
  k3 stride 2, FC to 256, FC to the outputs (the issue's mnist1d prototype).
- ``mlp``: two hidden layers of ``width`` units with ReLU.
- ``quadratic`` and ``two_layer``: the regression models of the theory lab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lnsgd.errors import LnsgdError
from lnsgd.recipe import ModelConfig


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data."""

    input_shape: tuple[int, ...]  # per example, e.g. (3, 32, 32) or (1, 40) or (64,)
    num_outputs: int  # classes, or regression targets
    task: str = "classification"  # or "regression"

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "num_outputs": self.num_outputs, "task": self.task}

    @staticmethod
    def from_dict(d: dict) -> DataSpec:
        return DataSpec(tuple(int(x) for x in d["input_shape"]), int(d["num_outputs"]), str(d.get("task", "classification")))


DEFAULT_WIDTH = {"resnet18": 64, "cnn": 32, "mlp": 512, "two_layer": 32, "quadratic": 1}
DEFAULT_NORM = {"resnet18": "groupnorm"}
DEFAULT_GROUP_SIZE = {"resnet18": 32}  # the authors' flag default; every other model: 16


def _norm(kind: str, channels: int, group_size: int, dims: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batchnorm":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}.get(dims, nn.BatchNorm1d)(channels)
    if channels % group_size:
        raise LnsgdError(
            f"model.group_size={group_size} does not divide a layer with {channels} channels; "
            f"choose a group_size that divides every width (e.g. a power of two ≤ {channels})"
        )
    return nn.GroupNorm(channels // group_size, channels)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm, dims: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        # torchvision's name for the projection shortcut; an empty Sequential is the identity.
        self.downsample = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class ResNet18(nn.Module):
    """ResNet18 for small images (He et al. 2016), built the way Damian et al. (2021) build it.

    Their models.py takes torchvision's resnet18 — 7×7 stride-2 stem, torchvision's
    init: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every conv, norm
    weights 1 and biases 0, nn.Linear's default for fc — then replaces the stem by a
    3×3 stride-1 conv re-initialized with the same kaiming_normal_, and the max-pool
    by the identity. We do the same steps in the same order, discarded 7×7 stem
    included: it costs nothing and consumes the random stream exactly as theirs does,
    so one seed gives their initial weights bit for bit (tests/test_models.py checks
    this against torchvision). The init matters beyond taste: with GroupNorm the
    effective step size scales like η/‖w‖², and PyTorch's default conv init has about
    half the weight norm, so learning rates would not transfer.
    """

    def __init__(self, in_channels: int, num_outputs: int, width: int, norm_kind: str, group_size: int):
        super().__init__()

        def norm(c: int) -> nn.Module:
            return _norm(norm_kind, c, group_size, 2)

        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)  # torchvision's stem, replaced below
        self.bn1 = norm(width)
        layers, c_in = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, w, stride, norm), BasicBlock(w, w, 1, norm)))
            c_in = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(widths[-1], num_outputs)
        for m in self.modules():  # torchvision's init, in module order
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The CIFAR stem (3×3, stride 1, no max-pool), re-initialized like every other conv.
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class SmallCNN(nn.Module):
    """conv k5 → conv k3 s2 → conv k3 s2 → FC 256 → FC out, for 1-D or 2-D inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, width: int, norm_kind: str, group_size: int):
        super().__init__()
        dims = len(input_shape) - 1
        if dims not in (1, 2):
            raise LnsgdError(f"model.name=cnn needs signals (C, L) or images (C, H, W); this dataset gives {input_shape}")
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        c = input_shape[0]
        self.features = nn.Sequential(
            conv(c, width, 5, 1, 2), _norm(norm_kind, width, group_size, dims), nn.ReLU(),
            conv(width, width, 3, 2, 1), _norm(norm_kind, width, group_size, dims), nn.ReLU(),
            conv(width, width, 3, 2, 1), _norm(norm_kind, width, group_size, dims), nn.ReLU(),
        )  # fmt: skip
        with torch.no_grad():
            flat = self.features(torch.zeros(2, *input_shape)).flatten(1).shape[1]
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(), nn.Linear(256, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten → (Linear → norm → ReLU) × 2 → Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, width: int, norm_kind: str, group_size: int):
        super().__init__()
        d = 1
        for s in input_shape:
            d *= s
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(d, width), _norm(norm_kind, width, group_size, 1), nn.ReLU(),
            nn.Linear(width, width), _norm(norm_kind, width, group_size, 1), nn.ReLU(),
            nn.Linear(width, num_outputs),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class QuadraticModel(nn.Module):
    """f(x; v) = ⟨v ⊙ v, x⟩ (quadratically parametrized linear regression, HaoChen et al. 2021)."""

    def __init__(self, d: int, init_scale: float):
        super().__init__()
        self.v = nn.Parameter(torch.full((d,), float(init_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ (self.v * self.v)).unsqueeze(-1)


class TwoLayer(nn.Module):
    """f(x) = aᵀ tanh(Wx)/√m, a small two-layer network for the theory lab."""

    def __init__(self, d: int, width: int, num_outputs: int):
        super().__init__()
        self.hidden = nn.Linear(d, width, bias=False)
        self.out = nn.Linear(width, num_outputs, bias=False)
        self.scale = width**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x.flatten(1)))) * self.scale


def group_size_of(config: ModelConfig) -> int:
    """GroupNorm channels per group: ``model.group_size``, or the model's default (32 for resnet18, 16 otherwise)."""
    return config.group_size or DEFAULT_GROUP_SIZE.get(config.name, 16)


def build_model(config: ModelConfig, spec: DataSpec) -> nn.Module:
    """Build the network described by ``config`` for data shaped like ``spec``.

    Parameters are initialized from torch's global RNG; callers that need
    reproducibility wrap this in ``torch.random.fork_rng`` with a seed (train.py does).
    """
    width = config.width or DEFAULT_WIDTH[config.name]
    norm = config.norm or DEFAULT_NORM.get(config.name, "none")
    group_size = group_size_of(config)
    if config.name == "resnet18":
        if len(spec.input_shape) != 3:
            raise LnsgdError(f"model.name=resnet18 needs images (C, H, W); this dataset gives {spec.input_shape}: use cnn or mlp")
        return ResNet18(spec.input_shape[0], spec.num_outputs, width, norm, group_size)
    if config.name == "cnn":
        return SmallCNN(spec.input_shape, spec.num_outputs, width, norm, group_size)
    if config.name == "mlp":
        return MLP(spec.input_shape, spec.num_outputs, width, norm, group_size)
    d = 1
    for s in spec.input_shape:
        d *= s
    if config.name == "quadratic":
        if spec.num_outputs != 1:
            raise LnsgdError("model.name=quadratic is a scalar regression model; use data.name=synthetic with loss=mse")
        return QuadraticModel(d, config.init_scale)
    if config.name == "two_layer":
        return TwoLayer(d, width, spec.num_outputs)
    raise LnsgdError(f"unknown model.name {config.name!r}")
