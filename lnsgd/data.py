"""Datasets as tensors on the run's device.

Every dataset is loaded once into memory — images as uint8, normalized on the fly
by ``Data.normalize`` — so the training loop batches by indexing a device tensor
with a permutation: no DataLoader workers, no PIL in the hot path.

- cifar10, cifar100, mnist, fashion_mnist, svhn: torchvision's own loading code
  (``root``, ``download``), so files on disk are checked the way torchvision checks them.
- digits: scikit-learn's bundled 8×8 digits (no network), a fixed 1297/500 split.
- mnist1d: generated locally by the ``mnist1d`` package (Greydanus 2020), seeded.
- synthetic: regression data for the theory lab (Gaussian x, sparse or two-layer teacher).

``train_size``/``test_size`` take a fixed subset: the first N of a permutation
seeded independently of the run seed, so every seed of a study sees the same data.

``data.augment=crop_flip`` (off by default, as in the paper) is ``crop_flip``: the
standard CIFAR augmentation, batched on the device from an explicit generator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lnsgd.errors import LnsgdError
from lnsgd.models import DataSpec
from lnsgd.recipe import DataConfig, Recipe, SyntheticData

SUBSET_SEED = 20211206  # fixed: subsets must not depend on the run's seed

# name -> (human name, torchvision class name, folder torchvision looks for, how to get it)
TORCHVISION = {
    "cifar10": ("CIFAR-10", "CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python"),
    "mnist": ("MNIST", "MNIST", "MNIST/raw"),
    "fashion_mnist": ("Fashion-MNIST", "FashionMNIST", "FashionMNIST/raw"),
    "svhn": ("SVHN", "SVHN", "train_32x32.mat / test_32x32.mat"),
}

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10, "svhn": 10, "digits": 10, "mnist1d": 10}

# Tests replace entries here with subclasses that carry fixture checksums.
TORCHVISION_CLASSES: dict[str, type] = {}


@dataclass
class Data:
    """Train and test tensors on one device, plus what models need to know."""

    name: str
    train_x: torch.Tensor  # uint8 images (N, C, H, W) or float features
    train_y: torch.Tensor  # int64 labels (N,) or float targets (N, k)
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # broadcastable to one example
    std: torch.Tensor
    spec: DataSpec

    @property
    def num_classes(self) -> int:
        return self.spec.num_outputs

    @property
    def is_classification(self) -> bool:
        return self.spec.task == "classification"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or float inputs → float32, standardized with the training set's statistics."""
        return (x.to(torch.float32) - self.mean) / self.std

    def to(self, device: torch.device | str) -> Data:
        move = lambda t: t.to(device)  # noqa: E731
        return Data(self.name, move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                    move(self.mean), move(self.std), self.spec)  # fmt: skip


def _subset(n_total: int, size: int | None, what: str, dataset: str) -> torch.Tensor | None:
    if size is None or size == n_total:
        return None
    if size > n_total:
        raise LnsgdError(f"data.{what}={size} but {dataset} has only {n_total} {what.split('_')[0]} examples; lower it or set null")
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n_total, generator=g)[:size].sort().values


def _torchvision_class(name: str) -> type:
    if name in TORCHVISION_CLASSES:
        return TORCHVISION_CLASSES[name]
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION[name][1])


def _load_torchvision(config: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pretty, _, folder = TORCHVISION[config.name]
    cls = _torchvision_class(config.name)
    root = Path(config.root)
    kwargs = {"split": "train" if train else "test"} if config.name == "svhn" else {"train": train}
    try:
        ds = cls(str(root), download=config.download, **kwargs)
    except RuntimeError as e:
        if config.download:
            raise LnsgdError(f"{pretty} under {root} is corrupt or incomplete ({e}); delete it and download again") from None
        raise LnsgdError(
            f"{pretty} not found under {root} (looked for {folder}); set data.download=true to fetch it, "
            f"or data.root=<folder containing {folder.split('/')[0]}>"
        ) from None
    except OSError as e:  # network failures during download (URLError is an OSError)
        raise LnsgdError(f"could not download {pretty} into {root}: {e}; download it elsewhere and set data.root") from None
    if config.name == "svhn":
        x = torch.as_tensor(ds.data)  # (N, 3, 32, 32) uint8
        y = torch.as_tensor(ds.labels, dtype=torch.int64)
    else:
        x = torch.as_tensor(ds.data)
        if x.ndim == 4:  # CIFAR: (N, H, W, C)
            x = x.permute(0, 3, 1, 2)
        else:  # MNIST-like: (N, H, W)
            x = x.unsqueeze(1)
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return x.contiguous(), y


def _load_digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.as_tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1297], perm[1297:]
    return x[train], y[train], x[test], y[test]


@functools.lru_cache(maxsize=1)  # generation takes seconds; stages of one process share it
def _load_mnist1d() -> tuple[torch.Tensor, ...]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise LnsgdError("data.name=mnist1d needs the mnist1d package: pip install mnist1d") from None
    # make_dataset generates locally (seeded by its args); get_dataset would try the network.
    d = make_dataset(get_dataset_args())
    x = torch.as_tensor(d["x"], dtype=torch.float32).unsqueeze(1)  # (4000, 1, 40)
    xt = torch.as_tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
    return x, torch.as_tensor(d["y"], dtype=torch.int64), xt, torch.as_tensor(d["y_test"], dtype=torch.int64)


def make_synthetic(cfg: SyntheticData) -> tuple[torch.Tensor, ...]:
    """Gaussian inputs and a teacher: sparse non-negative w* (HaoChen et al.) or a tanh network."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.n + cfg.n_test, cfg.d, generator=g, dtype=torch.float64)
    if cfg.teacher == "sparse_linear":
        if cfg.sparsity > cfg.d:
            raise LnsgdError(f"data.synthetic.sparsity={cfg.sparsity} exceeds data.synthetic.d={cfg.d}")
        w = torch.zeros(cfg.d, dtype=torch.float64)
        w[torch.randperm(cfg.d, generator=g)[: cfg.sparsity]] = 1.0
        y = x @ w
    else:
        W = torch.randn(cfg.teacher_width, cfg.d, generator=g, dtype=torch.float64) / cfg.d**0.5
        a = torch.randn(cfg.teacher_width, generator=g, dtype=torch.float64)
        y = torch.tanh(x @ W.T) @ a / cfg.teacher_width**0.5
        w = torch.cat([W.flatten(), a])
    y_train = y[: cfg.n] + cfg.label_noise_std * torch.randn(cfg.n, generator=g, dtype=torch.float64)
    return x[: cfg.n], y_train.unsqueeze(1), x[cfg.n :], y[cfg.n :].unsqueeze(1), w


def teacher_weights(cfg: SyntheticData) -> torch.Tensor:
    """The synthetic teacher's parameters (w* for sparse_linear)."""
    return make_synthetic(cfg)[4]


def load(recipe: Recipe | DataConfig, device: torch.device | str = "cpu") -> Data:
    """Load the recipe's dataset (train and test) as tensors on ``device``."""
    config = recipe.data if isinstance(recipe, Recipe) else recipe
    name = config.name
    task = "classification"
    if name in TORCHVISION:
        x, y = _load_torchvision(config, train=True)
        xt, yt = _load_torchvision(config, train=False)
    elif name == "digits":
        x, y, xt, yt = _load_digits()
    elif name == "mnist1d":
        x, y, xt, yt = _load_mnist1d()
    elif name == "synthetic":
        x, y, xt, yt, _ = make_synthetic(config.synthetic)
        x, y, xt, yt = x.float(), y.float(), xt.float(), yt.float()
        task = "regression"
    else:  # the schema rejects other names; this guards library callers
        raise LnsgdError(f"unknown data.name {name!r}")

    idx = _subset(len(x), config.train_size, "train_size", name)
    if idx is not None:
        x, y = x[idx], y[idx]
    idx = _subset(len(xt), config.test_size, "test_size", name)
    if idx is not None:
        xt, yt = xt[idx], yt[idx]

    if task == "regression":
        mean, std = torch.zeros(()), torch.ones(())  # the theory lab wants raw x
        num_outputs = y.shape[1]
    else:
        # Per-channel statistics of the training set (images) or one scalar (signals).
        xf = x.to(torch.float64)
        dims = [0] + list(range(2, x.ndim))
        if x.ndim >= 3:
            mean = xf.mean(dim=dims).reshape(-1, *([1] * (x.ndim - 2)))
            std = xf.std(dim=dims).reshape(-1, *([1] * (x.ndim - 2)))
        else:
            mean, std = xf.mean(), xf.std()
        mean, std = mean.float(), std.float().clamp_min(1e-6)
        num_outputs = NUM_CLASSES[name]  # fixed per dataset: a small subset may miss a class
    spec = DataSpec(tuple(x.shape[1:]), num_outputs, task)
    return Data(name, x, y, xt, yt, mean, std, spec).to(device)


# --------------------------------------------------------------------------- augmentation


def _check_images(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise LnsgdError(
            f"data.augment=crop_flip needs a batch of images (N, C, H, W); got a tensor of shape {tuple(x.shape)} "
            "(set data.augment=none for signals and features)"
        )


def crop_flip_params(
    n: int, generator: torch.Generator, padding: int = 4, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example (top, left, flip) for ``crop_flip_at``, drawn from ``generator`` only.

    top and left are uniform on {0, …, 2·padding} (the crop's corner in the padded
    image), flip is a fair coin. Draw order: one (2, n) ``randint`` for the offsets,
    then one (n,) ``randint`` for the flips; ``generator`` must live on ``device``.
    """
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return offsets[0], offsets[1], flip


def crop_flip_at(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Crop each image of ``x`` (N, C, H, W) at (top, left) of its zero-padded copy, then mirror it where ``flip``.

    Equivalent, example by example, to torchvision's ``pad(padding, fill=0)`` →
    ``crop(top, left, H, W)`` → ``horizontal_flip`` if flip, done for the whole batch
    with one gather (no Python loop over examples), on x's device and in x's dtype.
    """
    _check_images(x)
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros, in x's own units
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H) rows of the padded image
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # (N, W); flipped: read right to left
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with ``padding``-pixel zero padding and random horizontal flip, per example.

    The standard CIFAR augmentation (the authors' ``DA`` flag; torchvision's
    ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``), for a batch ``x``
    (N, C, H, W) on its device, drawing only from ``generator`` (which must be on
    x's device; ``crop_flip_params`` gives the draw order). Apply it to the raw uint8
    pixels, before ``Data.normalize``: the padding is 0 in pixel space (black), as
    torchvision's RandomCrop pads raw pixels with fill=0; after normalization it reads
    −mean/std per channel, not 0.
    """
    _check_images(x)
    top, left, flip = crop_flip_params(x.shape[0], generator, padding, x.device)
    return crop_flip_at(x, top, left, flip, padding)


def model_targets(data: Data, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """What the loss compares outputs with: labels for cross-entropy; one-hot or raw targets for mse."""
    if loss == "mse" and data.is_classification:
        return F.one_hot(labels, data.num_classes).to(torch.float32)
    return labels
