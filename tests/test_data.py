"""Data: torchvision's real CIFAR-10 loading code on an on-disk fixture, offline sets, subsets, errors."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from lnsgd import data as lnsgd_data
from lnsgd.errors import LnsgdError
from lnsgd.recipe import load_recipe

from .conftest import one_line_error


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10_fixture(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> tuple[type, np.ndarray, list]:
    """Write CIFAR-10's on-disk format (pickled batches of N×3072 uint8 rows) and return a
    torchvision CIFAR10 subclass whose checksum lists carry the fixture files' real md5s."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_train, all_labels = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name in names + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": name}, f)
        if name != "test_batch":
            all_train.append(x)
            all_labels += y
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)

    class FixtureCIFAR10(CIFAR10):
        train_list = [[n, _md5(folder / n)] for n in names]
        test_list = [["test_batch", _md5(folder / "test_batch")]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")}

    return FixtureCIFAR10, np.concatenate(all_train), all_labels


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    cls, x, y = write_cifar10_fixture(tmp_path / "data")
    monkeypatch.setitem(lnsgd_data.TORCHVISION_CLASSES, "cifar10", cls)
    return tmp_path / "data", x, y


def test_cifar10_through_torchvision_loading_code(cifar_root, write_recipe):
    root, x, y = cifar_root
    recipe = load_recipe(write_recipe({"data": {"name": "cifar10", "root": str(root), "train_size": None, "test_size": None}}))
    d = lnsgd_data.load(recipe)
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape == (100, 3, 32, 32)
    assert d.test_x.shape == (30, 3, 32, 32) and d.num_classes == 10
    # Same pixels as written: row-major 3072 = (C, H, W).
    assert torch.equal(d.train_x, torch.as_tensor(x).reshape(100, 3, 32, 32))
    assert d.train_y.tolist() == y
    # Normalization uses per-channel training statistics.
    z = d.normalize(d.train_x)
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


def test_subset_is_deterministic_and_independent_of_the_seed(cifar_root, write_recipe):
    root, x, _ = cifar_root
    base = {"data": {"name": "cifar10", "root": str(root), "train_size": 40, "test_size": 10}}
    a = lnsgd_data.load(load_recipe(write_recipe(base), ["seed=1"]))
    b = lnsgd_data.load(load_recipe(write_recipe(base), ["seed=2"]))
    assert a.train_x.shape[0] == 40 and a.test_x.shape[0] == 10
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    # A subset, not the first 40 rows.
    assert not torch.equal(a.train_x, torch.as_tensor(x[:40]).reshape(40, 3, 32, 32))


def test_corrupt_cifar_file_is_caught(cifar_root, write_recipe):
    root, _, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    recipe = load_recipe(write_recipe({"data": {"name": "cifar10", "root": str(root)}}))
    with pytest.raises(LnsgdError, match="not found under|corrupt"):
        lnsgd_data.load(recipe)


def test_missing_dataset_says_where_it_looked(cli, write_recipe, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    line = one_line_error(cli("train", write_recipe({"data": {"name": "cifar10", "root": str(empty)}}), "--quiet"))
    assert "CIFAR-10 not found under" in line and str(empty) in line and "data.download=true" in line
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing written for a run that could not start


def test_train_size_larger_than_dataset(write_recipe):
    with pytest.raises(LnsgdError, match="has only 1297"):
        lnsgd_data.load(load_recipe(write_recipe({"data": {"train_size": 5000}})))


def test_digits_offline():
    d = lnsgd_data.load(load_recipe_dict({"data": {"name": "digits"}}))
    assert d.train_x.shape == (1297, 1, 8, 8) and d.test_x.shape == (500, 1, 8, 8)
    assert d.train_x.dtype == torch.uint8 and d.num_classes == 10


def test_mnist1d_generated_locally():
    d = lnsgd_data.load(load_recipe_dict({"data": {"name": "mnist1d", "train_size": 500}}))
    assert d.train_x.shape == (500, 1, 40) and d.test_x.shape == (1000, 1, 40) and d.num_classes == 10


def test_synthetic_regression_sparse_teacher():
    r = load_recipe_dict({"data": {"name": "synthetic", "synthetic": {"n": 30, "d": 20, "sparsity": 3}}, "loss": "mse"})
    d = lnsgd_data.load(r)
    w = lnsgd_data.teacher_weights(r.data.synthetic)
    assert d.train_x.shape == (30, 20) and d.train_y.shape == (30, 1) and d.spec.task == "regression"
    assert int((w != 0).sum()) == 3
    assert torch.allclose(d.train_x.double() @ w, d.train_y.double().squeeze(1), atol=1e-5)


def load_recipe_dict(raw: dict):
    from lnsgd.recipe import recipe_from_dict

    return recipe_from_dict(raw)
