"""Networks used for condensation, evaluation and feature extraction.

Every model's ``forward`` returns ``(logits, features)``, where ``features`` is
the list of intermediate block outputs (ConvNet: one per block; ResNet18: the
four stage outputs, index 0-3), as the paper's listings use them.
``embed(x)`` returns the flattened pre-classifier features that DM matches.

Models are built by name through ``MODELS`` / ``build_model``; the names are
the ones of the public DC/DSA/DM code (ConvNet, ConvNetW128, ConvNetBN, ...).
These are plain torch modules; the CPU fast path (``--ops fast``) is applied to a
built model by ``dcbs.fast_ops.apply_ops`` and computes the same functions.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvNet", "ConvBlock", "MLP", "LeNet", "AlexNet", "VGG11", "ResNet18", "MODELS", "build_model",
           "model_names", "num_feature_layers"]


# --------------------------------------------------------------------------- #
# building blocks
# --------------------------------------------------------------------------- #
def _act(name: str) -> nn.Module:
    acts = {"relu": lambda: nn.ReLU(inplace=True), "sigmoid": nn.Sigmoid,
            "leakyrelu": lambda: nn.LeakyReLU(negative_slope=0.01)}
    return acts[name]()


def _pool(name: str) -> nn.Module | None:
    pools = {"avgpooling": lambda: nn.AvgPool2d(2, 2), "maxpooling": lambda: nn.MaxPool2d(2, 2),
             "none": lambda: None}
    return pools[name]()


def _norm(name: str, channels: int, spatial: tuple[int, int]) -> nn.Module | None:
    norms = {
        "instancenorm": lambda: nn.GroupNorm(channels, channels, affine=True),
        "batchnorm": lambda: nn.BatchNorm2d(channels, affine=True),
        "layernorm": lambda: nn.LayerNorm([channels, *spatial], elementwise_affine=True),
        "groupnorm": lambda: nn.GroupNorm(4, channels, affine=True),
        "none": lambda: None,
    }
    return norms[name]()


class _Blocks(nn.Module):
    """Runs a list of blocks and keeps every block's output."""

    def forward_blocks(self, x):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return x, feats

    def forward(self, x):
        out, feats = self.forward_blocks(x)
        return self.classifier(out.flatten(1)), feats

    def embed(self, x):
        return self.forward_blocks(x)[0].flatten(1)


# --------------------------------------------------------------------------- #
# ConvNet and its ablations
# --------------------------------------------------------------------------- #
class ConvBlock(nn.Sequential):
    """One ConvNet block: conv -> [norm] -> act -> [pool] (``dcbs.fast_ops`` swaps it for its CPU fast path)."""


class ConvNet(_Blocks):
    """conv3x3 -> norm -> act -> pool, ``depth`` times, then a linear classifier.

    A 28x28 one-channel input is padded by 3 in the first conv so the map is 32x32
    and the feature size matches CIFAR's (2048 for width 128, depth 3).
    """

    def __init__(self, channel, num_classes, net_width=128, net_depth=3, net_act="relu",
                 net_norm="instancenorm", net_pooling="avgpooling", im_size=(32, 32)):
        super().__init__()
        h, w = (32, 32) if tuple(im_size) == (28, 28) else tuple(im_size)
        blocks, in_ch = [], channel
        for d in range(net_depth):
            pad = 3 if channel == 1 and d == 0 and tuple(im_size) == (28, 28) else 1
            layers = [nn.Conv2d(in_ch, net_width, kernel_size=3, padding=pad)]
            norm = _norm(net_norm, net_width, (h, w))
            if norm is not None:
                layers.append(norm)
            layers.append(_act(net_act))
            pool = _pool(net_pooling)
            if pool is not None:
                layers.append(pool)
                h, w = h // 2, w // 2
            blocks.append(ConvBlock(*layers))
            in_ch = net_width
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = net_width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)


# --------------------------------------------------------------------------- #
# other evaluation architectures of the reference code
# --------------------------------------------------------------------------- #
class MLP(nn.Module):
    def __init__(self, channel, num_classes, im_size=(32, 32)):
        super().__init__()
        n_in = channel * im_size[0] * im_size[1]
        self.fc_1 = nn.Linear(n_in, 128)
        self.fc_2 = nn.Linear(128, 128)
        self.fc_3 = nn.Linear(128, num_classes)

    def embed(self, x):
        return self.forward(x)[1][-1]

    def forward(self, x):
        h1 = F.relu(self.fc_1(x.flatten(1)))
        h2 = F.relu(self.fc_2(h1))
        return self.fc_3(h2), [h1, h2]


class LeNet(_Blocks):
    def __init__(self, channel, num_classes, im_size=(32, 32)):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channel, 6, 5, padding=2 if channel == 1 else 0),
                          nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)),
            nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)),
        ])
        self.classifier = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
                                        nn.Linear(120, 84), nn.ReLU(inplace=True),
                                        nn.Linear(84, num_classes))


class AlexNet(_Blocks):
    def __init__(self, channel, num_classes, im_size=(32, 32)):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channel, 128, 5, padding=4 if channel == 1 else 2),
                          nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)),
            nn.Sequential(nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)),
            nn.Sequential(nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)),
        ])
        self.classifier = nn.Linear(192 * 4 * 4, num_classes)


class VGG11(_Blocks):
    """VGG11 with instance norm (default) or batch norm, one block per pooling stage."""

    CFG = [[64], [128], [256, 256], [512, 512], [512, 512]]

    def __init__(self, channel, num_classes, norm="instancenorm", im_size=(32, 32)):
        super().__init__()
        blocks, in_ch = [], channel
        for s, stage in enumerate(self.CFG):
            layers = []
            for i, out_ch in enumerate(stage):
                pad = 3 if channel == 1 and s == 0 and i == 0 else 1
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=pad), _norm(norm, out_ch, (1, 1)),
                           nn.ReLU(inplace=True)]
                in_ch = out_ch
            layers.append(nn.MaxPool2d(2, 2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(512, num_classes)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, planes, (1, 1))
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, planes, (1, 1))
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          _norm(norm, planes, (1, 1)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet18: 3x3 stem at stride 1, no max-pool, four stages.

    ``features`` are the four stage outputs (64, 128, 256, 512 channels), which the
    paper clusters (``layer_idx`` 0-3). Attribute names follow torchvision's
    resnet18 (conv1/bn1/layer1..4/fc) so ImageNet weights map onto it.
    """

    def __init__(self, channel, num_classes, norm="instancenorm", im_size=(32, 32)):
        super().__init__()
        self.conv1 = nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, 64, (1, 1))
        in_planes, stages = 64, []
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(_BasicBlock(in_planes, planes, stride, norm),
                                        _BasicBlock(planes, planes, 1, norm)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, num_classes)

    def forward_blocks(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return x, feats

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.forward_blocks(x)[0], 1).flatten(1)

    def forward(self, x):
        out, feats = self.forward_blocks(x)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1)), feats


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #
def _convnet(**kw):
    return lambda channel, num_classes, im_size: ConvNet(channel, num_classes, im_size=im_size, **kw)


MODELS = {
    "ConvNet": _convnet(),
    "MLP": lambda c, n, s: MLP(c, n, im_size=s),
    "LeNet": lambda c, n, s: LeNet(c, n, im_size=s),
    "AlexNet": lambda c, n, s: AlexNet(c, n, im_size=s),
    "VGG11": lambda c, n, s: VGG11(c, n, norm="instancenorm", im_size=s),
    "VGG11BN": lambda c, n, s: VGG11(c, n, norm="batchnorm", im_size=s),
    "ResNet18": lambda c, n, s: ResNet18(c, n, norm="instancenorm", im_size=s),
    "ResNet18BN": lambda c, n, s: ResNet18(c, n, norm="batchnorm", im_size=s),
}
MODELS.update({f"ConvNetD{d}": _convnet(net_depth=d) for d in (1, 2, 3, 4)})
MODELS.update({f"ConvNetW{w}": _convnet(net_width=w) for w in (32, 64, 128, 256)})
MODELS.update({"ConvNetAS": _convnet(net_act="sigmoid"), "ConvNetAR": _convnet(net_act="relu"),
               "ConvNetAL": _convnet(net_act="leakyrelu")})
MODELS.update({"ConvNetNP": _convnet(net_pooling="none"), "ConvNetMP": _convnet(net_pooling="maxpooling"),
               "ConvNetAP": _convnet(net_pooling="avgpooling")})
MODELS.update({"ConvNetNN": _convnet(net_norm="none"), "ConvNetBN": _convnet(net_norm="batchnorm"),
               "ConvNetLN": _convnet(net_norm="layernorm"), "ConvNetIN": _convnet(net_norm="instancenorm"),
               "ConvNetGN": _convnet(net_norm="groupnorm")})


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, channel: int, num_classes: int, im_size=(32, 32)) -> nn.Module:
    """Builds model ``name`` with the current torch RNG (seed it first for a fixed init)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    return MODELS[name](channel, num_classes, tuple(im_size))


def num_feature_layers(name: str) -> int:
    """How many entries the ``features`` list of model ``name`` has (layer_idx range)."""
    if name.startswith("ResNet18"):
        return 4
    if name.startswith("ConvNetD"):
        return int(name[len("ConvNetD"):])
    if name.startswith("ConvNet"):
        return 3
    return {"MLP": 2, "LeNet": 2, "AlexNet": 3, "VGG11": 5, "VGG11BN": 5}[name]
