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


# --------------------------------------------------------------------------- crop_flip augmentation


def test_crop_flip_at_matches_torchvision_pad_crop_hflip_for_every_offset_and_flip():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    combos = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)]  # noqa: E741
    x = torch.randint(1, 256, (len(combos), 3, 32, 32), generator=g, dtype=torch.uint8)  # no 0s: padding shows
    top, left, flip = (torch.tensor(v) for v in zip(*combos))
    out = lnsgd_data.crop_flip_at(x, top, left, flip)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i, (t, l, f) in enumerate(combos):  # noqa: E741
        ref = TF.crop(TF.pad(x[i], [4], fill=0), t, l, 32, 32)  # torchvision's RandomCrop(32, padding=4) at (t, l)
        if f:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[i], ref), (t, l, f)
    # (4, 4) without a flip is the identity; the corners show 4 rows/columns of zero padding.
    assert torch.equal(out[combos.index((4, 4, False))], x[combos.index((4, 4, False))])
    assert (out[combos.index((0, 0, False)), :, :4, :] == 0).all() and (out[combos.index((0, 0, False)), :, 4:, 4:] > 0).all()


def _decode_crop_flip(out: torch.Tensor, padding: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flip) of crop_flip outputs of the coordinate image (channel 0: row+1, channel 1:
    column+1), and check that each output is a translated (and mirrored) copy: on every pixel that
    is not padding, source row − output row and source column ∓ output column are constant."""
    n, _, h, w = out.shape
    valid = out[:, 0] > 0
    i = torch.arange(h)[None, :, None].expand(n, h, w)
    j = torch.arange(w)[None, None, :].expand(n, h, w)
    src_row, src_col = out[:, 0].long() - 1, out[:, 1].long() - 1
    big = 10**6

    def constant(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.where(valid, v, big).flatten(1).min(1).values
        hi = torch.where(valid, v, -big).flatten(1).max(1).values
        return lo, lo == hi

    top, ok = constant(src_row - i)
    assert ok.all()
    straight, is_straight = constant(src_col - j)
    mirrored, is_mirrored = constant(src_col + j)
    assert (is_straight ^ is_mirrored).all()  # at least 2 columns survive any crop, so exactly one holds
    left = torch.where(is_straight, straight, mirrored - (w - 1)) + padding
    return top + padding, left, is_mirrored


def test_crop_flip_offsets_are_uniform_over_0_to_8_and_flips_fair():
    n, h, w = 18_000, 8, 8
    rows = torch.arange(1, h + 1, dtype=torch.uint8)[:, None].expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.uint8)[None, :].expand(h, w)
    x = torch.stack([rows, cols]).expand(n, 2, h, w).contiguous()  # (N, 2, 8, 8): coordinates as pixels
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    out = lnsgd_data.crop_flip(x, g)
    top, left, flip = _decode_crop_flip(out)
    expected = n / 9
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9).double()
        assert counts.numel() == 9  # nothing outside 0..8
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 26.1, counts  # χ²(8) at p = 0.999
    assert abs(flip.double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    # The three draws are independent of each other: the (top, left) pairs are uniform over 81 cells.
    pairs = torch.bincount(top * 9 + left, minlength=81).double()
    assert ((pairs - n / 81) ** 2 / (n / 81)).sum().item() < 124.8  # χ²(80) at p = 0.999
    # Only the given generator is drawn from: the same state gives the same batch, whatever torch's global RNG does.
    g.set_state(state)
    torch.manual_seed(123)
    assert torch.equal(lnsgd_data.crop_flip(x, g), out)


def test_crop_flip_works_on_float_images_and_refuses_non_images():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 3, 16, 16, generator=g) + 1
    out = lnsgd_data.crop_flip(x, g)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert set(torch.unique(out[out <= 1]).tolist()) <= {0.0}  # only padding is ≤ 1
    with pytest.raises(LnsgdError, match=r"needs a batch of images \(N, C, H, W\)"):
        lnsgd_data.crop_flip(torch.zeros(5, 1, 40), g)
