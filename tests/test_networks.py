import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from networks import build_model, model_names, num_feature_layers


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_convnet_cifar10_has_exactly_320010_parameters():
    assert n_params(build_model("ConvNet", 3, 10, (32, 32))) == 320010


def test_convnet_fashionmnist_parameters_and_shapes():
    m = build_model("ConvNet", 1, 10, (28, 28))
    # first conv 1->128 (3x3, pads by 3 so the map is 32x32): 1*128*9 + 128
    assert n_params(m) == 320010 - (3 * 128 * 9) + (1 * 128 * 9)
    logits, feats = m(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert [tuple(f.shape) for f in feats] == [(2, 128, 16, 16), (2, 128, 8, 8), (2, 128, 4, 4)]
    assert m.embed(torch.randn(2, 1, 28, 28)).shape == (2, 2048)


def test_convnet_cifar_feature_shapes():
    logits, feats = build_model("ConvNet", 3, 10, (32, 32))(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 16, 16), (2, 128, 8, 8), (2, 128, 4, 4)]


def test_convnet_uses_instance_norm_as_groupnorm_one_channel_per_group():
    m = build_model("ConvNet", 3, 10, (32, 32))
    gns = [x for x in m.modules() if isinstance(x, torch.nn.GroupNorm)]
    assert len(gns) == 3 and all(g.num_groups == g.num_channels == 128 and g.affine for g in gns)
    # instance norm: one sample's output does not depend on the others in the batch
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(m(x)[0][:1], m(x[:1])[0], atol=1e-5)


def test_resnet18_four_stage_features():
    m = build_model("ResNet18", 3, 10, (32, 32))
    _, feats = m(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    assert [f.shape[2] for f in feats] == [32, 16, 8, 4]


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("channel,size", [(1, (28, 28)), (3, (32, 32))])
def test_every_registered_model_builds_and_returns_logits_and_features(name, channel, size):
    m = build_model(name, channel, 10, size)
    logits, feats = m(torch.randn(2, channel, *size))
    assert logits.shape == (2, 10)
    assert len(feats) == num_feature_layers(name)
    assert m.embed(torch.randn(2, channel, *size)).shape[0] == 2


def test_variants_differ_as_named():
    assert n_params(build_model("ConvNetW32", 3, 10)) < n_params(build_model("ConvNet", 3, 10))
    assert len(build_model("ConvNetD4", 3, 10)(torch.randn(1, 3, 32, 32))[1]) == 4
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in build_model("ConvNetBN", 3, 10).modules())
    assert any(isinstance(x, torch.nn.Sigmoid) for x in build_model("ConvNetAS", 3, 10).modules())
    assert any(isinstance(x, torch.nn.MaxPool2d) for x in build_model("ConvNetMP", 3, 10).modules())


def test_unknown_model_refused_with_choices():
    with pytest.raises(ValueError, match="ConvNet"):
        build_model("ResNet50", 3, 10)


def test_the_model_file_is_plain_torch():
    """networks.py imports nothing of ours (the fast path imports it, not the other way round) and
    builds torch's own layers: 2x2 average pooling is nn.AvgPool2d."""
    code = "import sys, networks; print(sorted(m for m in sys.modules if m.split('.')[0] in ('dcbs', 'utils')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    pools = [type(m) for m in build_model("ConvNet", 3, 10).modules() if "Pool" in type(m).__name__]
    assert pools == [torch.nn.AvgPool2d] * 3
