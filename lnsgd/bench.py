"""``lnsgd bench``: lnsgd's training step against the reference pipeline, side by side.

The reference is how the paper's code (and most research code) trains: a torchvision
dataset of PIL images with ``ToTensor`` + ``Normalize`` transforms, a DataLoader with
worker processes and pinned memory, fp32, eager, label noise by ``torch.multinomial``
on the host side of the step. lnsgd keeps the data on the device as uint8, normalizes
on the fly, draws the permutation and the noise on the device, and can run in bf16
and under ``torch.compile`` (with CUDA graphs). Both run in one process on the same
device and model, on random CIFAR-shaped data; the ratio is what matters.

On a CPU the figures mean nothing (a tiny configuration so CI can run the code path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from lnsgd.errors import LnsgdError
from lnsgd.models import DataSpec, build_model
from lnsgd.recipe import ModelConfig
from lnsgd.train.step import autocast_for, check_compile_mode, tf32_allowed

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class BenchConfig:
    model: str = "resnet18"
    width: int | None = None  # model width; None: the model's default (64 for resnet18)
    group_size: int = 32  # GroupNorm channels per group (ResNet18-GN as the authors built it)
    batch_size: int = 256
    steps: int = 50  # timed steps per pipeline, after warmup
    warmup: int = 5
    train_size: int = 50_000  # images per "epoch" (CIFAR-10: 50k train, 10k test)
    test_size: int = 10_000
    image: int = 32
    precision: str = "bf16"  # of lnsgd's step: fp32 | tf32 | bf16
    compile: str = "cuda-graphs"  # of lnsgd's step: off | default | cuda-graphs
    workers: int = 4  # DataLoader workers of the reference
    epoch: bool = True  # also time one full epoch + test evaluation of each
    p: float = 0.2


def tiny_cpu_config() -> BenchConfig:
    return BenchConfig(width=4, group_size=2, batch_size=32, steps=5, warmup=1, train_size=256, test_size=128, image=16, precision="fp32",
                       compile="off", workers=0)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class _PILDataset(torch.utils.data.Dataset):
    """CIFAR-10-like: uint8 HWC arrays turned into PIL images and transformed per item, as torchvision's CIFAR10 does."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _model(cfg: BenchConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    spec = DataSpec((3, cfg.image, cfg.image), 10)
    return build_model(ModelConfig(name=cfg.model, width=cfg.width, group_size=cfg.group_size), spec).to(device)


def reference_pipeline(cfg: BenchConfig, images, labels, test_images, test_labels, device: torch.device) -> dict:
    """Images/s of the reference training loop, and one epoch + test evaluation."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                     drop_last=True, persistent_workers=cfg.workers > 0)  # fmt: skip
    train_loader = torch.utils.data.DataLoader(_PILDataset(images, labels, tf), shuffle=True, **loader_kw)
    test_loader = torch.utils.data.DataLoader(_PILDataset(test_images, test_labels, tf), shuffle=False,
                                              **{**loader_kw, "drop_last": False})  # fmt: skip
    model = _model(cfg, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probs = torch.full((10,), cfg.p / 9)

    def step(x, y):
        # Multinomial label noise on the host, as the paper's code does per batch.
        flip = torch.rand(len(y)) < cfg.p
        noisy = torch.where(flip, (y + 1 + torch.multinomial(probs[:9] / probs[:9].sum(), len(y), replacement=True)) % 10, y)
        x, noisy = x.to(device, non_blocking=True), noisy.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), noisy)
        loss.backward()
        opt.step()
        return loss.item()  # the reference logs every step: a host sync

    it = iter(train_loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(train_loader)
            return next(it)

    for _ in range(cfg.warmup):
        step(*next_batch())
    _sync(device)
    _reset_peak(device)
    t = time.perf_counter()
    for _ in range(cfg.steps):
        step(*next_batch())
    _sync(device)
    out = {"img_per_s": cfg.steps * cfg.batch_size / (time.perf_counter() - t), "peak_mb": _peak_mb(device)}
    if cfg.epoch:
        t = time.perf_counter()
        for x, y in train_loader:
            step(x, y)
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        model.train()
        _sync(device)
        out["epoch_s"] = time.perf_counter() - t
    return out


def lnsgd_pipeline(cfg: BenchConfig, images, labels, test_images, test_labels, device: torch.device) -> dict:
    """Images/s of lnsgd's own training step (``lnsgd.train.step.TrainStep``, as ``lnsgd train``
    runs it) and one epoch + test evaluation."""
    from lnsgd.data import Data
    from lnsgd.losses import clean_loss
    from lnsgd.recipe import NoiseConfig
    from lnsgd.train.loop import evaluate, plain_train_set
    from lnsgd.train.optim import SGD
    from lnsgd.train.step import TrainStep

    as_images = lambda a: torch.as_tensor(a).permute(0, 3, 1, 2).contiguous().to(device)  # noqa: E731 - uint8 on the device
    mean = torch.tensor(CIFAR_MEAN, device=device).view(3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD, device=device).view(3, 1, 1) * 255
    data = Data("bench", as_images(images), torch.as_tensor(labels, dtype=torch.int64).to(device), as_images(test_images),
                torch.as_tensor(test_labels, dtype=torch.int64).to(device), mean, std, DataSpec((3, cfg.image, cfg.image), 10))  # fmt: skip
    model = _model(cfg, device)
    train_set, test_set = plain_train_set(data, "cross_entropy"), plain_train_set(data, "cross_entropy", split="test")
    B = cfg.batch_size
    spe = len(labels) // B
    step = TrainStep(model, train_set, clean_loss("cross_entropy"), NoiseConfig(kind="flip", p=cfg.p), 10,
                     SGD(dict(model.named_parameters())), batch_size=B, steps_per_epoch=spe, precision=cfg.precision,
                     compile_mode=cfg.compile, device=device)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)

    def epoch_start():
        step.start_epoch(torch.randperm(len(labels), generator=gen, device=device), gen, None, [0.1] * spe)

    def run(steps: int) -> None:
        for i in range(steps):
            if i % spe == 0:
                epoch_start()
            step.step()

    run(cfg.warmup)
    _sync(device)
    _reset_peak(device)
    t = time.perf_counter()
    run(cfg.steps)
    _sync(device)
    out = {"img_per_s": cfg.steps * B / (time.perf_counter() - t), "peak_mb": _peak_mb(device)}
    if cfg.epoch:
        t = time.perf_counter()
        run(spe)
        evaluate(model, test_set, clean_loss("cross_entropy"), clean_loss("cross_entropy"), 2048, True,
                 autocast_for(cfg.precision, device))  # one host sync at its end  # fmt: skip
        _sync(device)
        out["epoch_s"] = time.perf_counter() - t
    return out


def run_bench(cfg: BenchConfig, device: torch.device) -> dict:
    """Both pipelines on random CIFAR-shaped data; returns figures and ratios."""
    import numpy as np

    check_compile_mode(cfg.compile, device)
    if cfg.precision not in ("fp32", "tf32", "bf16"):
        raise LnsgdError(f"precision {cfg.precision!r}: expected fp32, tf32 or bf16")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(cfg.train_size, cfg.image, cfg.image, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=cfg.train_size)
    test_images = rng.integers(0, 256, size=(cfg.test_size, cfg.image, cfg.image, 3), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=cfg.test_size)
    # Both pipelines run under the numeric settings `lnsgd train` uses for this precision.
    with tf32_allowed(cfg.precision == "tf32"):
        ref = reference_pipeline(cfg, images, labels, test_images, test_labels, device)
        own = lnsgd_pipeline(cfg, images, labels, test_images, test_labels, device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "config": cfg.__dict__,
              "reference": ref, "lnsgd": own, "throughput_ratio": own["img_per_s"] / ref["img_per_s"]}  # fmt: skip
    if cfg.epoch:
        result["epoch_ratio"] = ref["epoch_s"] / own["epoch_s"]
    return result
