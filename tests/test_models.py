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


# --------------------------------------------------------------------------- the authors' ResNet18


def authors_resnet18(group_size: int = 32) -> nn.Module:
    """The reference: torchvision's resnet18 with GroupNorm(c // 32, c), its 7×7 stem replaced by a
    3×3 stride-1 conv re-initialized with kaiming_normal_(fan_out, relu), and no max-pool — the
    construction of adamian98/LabelNoiseFlatMinimizers' models.py, done here with torchvision."""
    import torchvision

    ref = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(c // group_size, c))
    ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(ref.conv1.weight, mode="fan_out", nonlinearity="relu")
    ref.maxpool = nn.Identity()
    return ref


def test_resnet18_is_the_authors_torchvision_model_bit_for_bit():
    torch.manual_seed(0)
    ref = authors_resnet18()
    torch.manual_seed(0)
    ours = build_model(ModelConfig(name="resnet18"), IMG)  # defaults: full width, GroupNorm, 32 channels per group
    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    # torchvision's names (downsample, bn1, bn2, fc), so checkpoints and the authors' weights line up.
    assert list(our_params) == list(ref_params)
    assert {k: v.shape for k, v in our_params.items()} == {k: v.shape for k, v in ref_params.items()}
    assert sum(p.numel() for p in ours.parameters()) == 11_173_962
    groups = [(m.num_groups, m.num_channels) for m in ours.modules() if isinstance(m, nn.GroupNorm)]
    assert groups == [(m.num_groups, m.num_channels) for m in ref.modules() if isinstance(m, nn.GroupNorm)]
    assert all(c // g == 32 for g, c in groups)
    # The same seed draws the same weights: the generator is consumed in torchvision's order.
    different = [k for k in ref_params if not torch.equal(our_params[k], ref_params[k])]
    assert different == []
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["groupnorm", "batchnorm"])
def test_resnet18_initialization_is_torchvisions(norm):
    """Closed forms of torchvision's init: conv weights N(0, 2/fan_out) with fan_out = c_out·k·k
    (He et al. 2015), norm weights 1 and biases 0, fc nn.Linear's U(±1/√fan_in)."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="resnet18", norm=norm), IMG)
    convs = [(n, x) for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks × 2, 3 downsample 1×1 convs
    for name, conv in convs:
        w = conv.weight.detach().double()
        n = w.numel()
        std = (2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) ** 0.5
        # Sampling error of the std of n normals is std/√(2n); of the mean, std/√n. Allow 5 of each.
        assert abs(w.std().item() / std - 1) < 5 / (2 * n) ** 0.5, name
        assert abs(w.mean().item()) < 5 * std / n**0.5, name
    norms = [x for x in m.modules() if isinstance(x, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(norms) == 1 + 16 + 3
    assert all(torch.equal(x.weight, torch.ones_like(x.weight)) and torch.equal(x.bias, torch.zeros_like(x.bias)) for x in norms)
    bound = 1 / 512**0.5  # nn.Linear's default: weight and bias U(−1/√fan_in, 1/√fan_in)
    for p in (m.fc.weight, m.fc.bias):
        assert p.abs().max().item() <= bound and p.abs().max().item() > 0.9 * bound
    assert abs(m.fc.weight.std().item() - bound / 3**0.5) < 0.05 * bound


def test_resnet18_group_size_defaults_to_32_and_others_to_16():
    gn = lambda m: {x.num_channels // x.num_groups for x in m.modules() if isinstance(x, nn.GroupNorm)}  # noqa: E731
    assert gn(build_model(ModelConfig(name="resnet18", width=32), IMG)) == {32}
    assert gn(build_model(ModelConfig(name="cnn", norm="groupnorm"), DataSpec((1, 40), 10))) == {16}
    assert gn(build_model(ModelConfig(name="mlp", width=64, norm="groupnorm"), DataSpec((1, 8, 8), 10))) == {16}
