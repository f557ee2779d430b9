"""Models: the paper's ResNet18 layout, norms, widths and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lnsgd.errors import LnsgdError
from lnsgd.models import DataSpec, ResNet18, build_model
from lnsgd.recipe import ModelConfig

IMG = DataSpec((3, 32, 32), 10)


@pytest.mark.parametrize("norm", ["groupnorm", "batchnorm", "none"])
def test_resnet18_cifar_stem_and_norms(norm):
    m = build_model(ModelConfig(name="resnet18", width=8, norm=norm, group_size=4), IMG)
    assert isinstance(m, ResNet18)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)  # CIFAR stem, no max-pool
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    kinds = {nn.GroupNorm: "groupnorm", nn.BatchNorm2d: "batchnorm"}
    found = {kinds[type(x)] for x in m.modules() if type(x) in kinds}
    assert found == ({norm} if norm != "none" else set())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # 8 BasicBlocks with two 3x3 convs each, widths 8,16,32,64.
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3)]
    assert len(convs) == 1 + 16
    assert m.fc.in_features == 64


def test_resnet18_full_width_parameter_count():
    m = build_model(ModelConfig(name="resnet18", norm="batchnorm"), IMG)
    # torchvision resnet18 with a 3x3 stem and 10 classes has 11,173,962 parameters.
    assert sum(p.numel() for p in m.parameters()) == 11_173_962


def test_groupnorm_group_size():
    m = build_model(ModelConfig(name="resnet18", width=16, group_size=8), IMG)
    gn = [x for x in m.modules() if isinstance(x, nn.GroupNorm)]
    assert all(x.num_channels // x.num_groups == 8 for x in gn)


def test_group_size_must_divide_channels():
    with pytest.raises(LnsgdError, match="group_size=6 does not divide"):
        build_model(ModelConfig(name="resnet18", width=8, group_size=6), IMG)


def test_cnn_1d_and_2d_and_mlp():
    m = build_model(ModelConfig(name="cnn"), DataSpec((1, 40), 10))
    assert m(torch.randn(3, 1, 40)).shape == (3, 10)
    assert m.head[1].in_features == 320  # 32 channels x 10 positions, as in the mnist1d prototype
    m = build_model(ModelConfig(name="cnn", width=8), DataSpec((1, 8, 8), 10))
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    m = build_model(ModelConfig(name="mlp", width=16, norm="groupnorm", group_size=4), DataSpec((1, 8, 8), 10))
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_resnet18_rejects_1d_data():
    with pytest.raises(LnsgdError, match="needs images"):
        build_model(ModelConfig(name="resnet18"), DataSpec((1, 40), 10))
