"""Network registry (timm-style): `@register_network` on a factory, `get_network(name, ...)`, `list_networks()`.

Every network takes (channels, num_classes, im_size) and works for 1 or 3 channels at 8, 28 and 32 px. Every
network exposes `embed(x)` (penultimate features, used by DM and herding) and `classifier` (the last layer).
Reference names follow the DC/DSA/DM code: ConvNet = ConvNet-3, width 128, instance norm, ReLU, average pooling.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional
import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.platform.errors import unknown_name

_NETWORKS = {}


def register_network(name, **defaults):
    """Register `fn(channels, num_classes, size, **options) -> nn.Module` under `name`: `size` is the side of the
    (square) images, `defaults` the options' values unless a config or suite overrides them."""
    def deco(fn):
        _NETWORKS[name] = (fn, defaults)
        return fn
    return deco


def list_networks(pattern="*"):
    return sorted(n for n in _NETWORKS if fnmatch.fnmatch(n, pattern))


def get_network(name, channels, num_classes, im_size, seed=None, **overrides):
    """Build a registered network. With `seed`, construction is seeded (same seed, same initial weights) without
    touching the global RNG stream."""
    if name not in _NETWORKS:
        raise unknown_name("network", name, _NETWORKS)
    fn, defaults = _NETWORKS[name]
    kwargs = {**defaults, **overrides}
    size = im_size if isinstance(im_size, int) else im_size[0]
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        return fn(channels, num_classes, size, **kwargs)


def make_norm(norm, ch, size):
    if size is not None and size < 2 and norm in ("instance", "layer"):
        return nn.Identity()  # normalising a single value per channel zeroes it: skip (8 px inputs in deep nets)
    if norm == "instance":  # the reference's 'instancenorm': GroupNorm with one group per channel, affine
        return nn.GroupNorm(ch, ch, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(ch)
    if norm == "layer":
        return nn.LayerNorm([ch, size, size], elementwise_affine=True)
    if norm == "group":
        return nn.GroupNorm(4, ch, affine=True)
    if norm in ("none", None):
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r} (instance, batch, layer, group, none)")


def make_act(act):
    return {"relu": nn.ReLU(), "leakyrelu": nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU()}[act]


@dataclass
class NetworkOptions:
    """The network option group of every method config that builds networks by name (declared once, here)."""
    network: str = "ConvNet"
    net_width: Optional[int] = None      # None: the network's own width

    def build_network(self, dataset, seed, device):
        kw = {"width": self.net_width} if self.net_width else {}
        return get_network(self.network, dataset.channels, dataset.num_classes, dataset.image_size, seed=seed,
                           **kw).to(device)


class ConvNet(nn.Module):
    """Depth x [conv3x3(width) -> norm -> act -> pool2x2] -> linear. 28 px inputs get padding 3 in the first conv
    (as the reference does for MNIST) so feature maps go 32-16-8-4. Pooling stops once maps reach 1x1 (8 px digits
    at depth >= 4)."""

    def __init__(self, channels, num_classes, im_size, width=128, depth=3, norm="instance", act="relu", pool="avg"):
        super().__init__()
        layers, ch, size = [], channels, im_size
        for d in range(depth):
            pad = 3 if (d == 0 and im_size == 28) else 1
            layers.append(nn.Conv2d(ch, width, 3, padding=pad))
            size = size + 2 * pad - 2
            layers += [make_norm(norm, width, size), make_act(act)]
            if size >= 2 and pool != "none":
                layers.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
                size //= 2
            ch = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = ch * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


for _name, _kw in {
    "ConvNet": {}, "ConvNetW32": {"width": 32}, "ConvNetW64": {"width": 64}, "ConvNetW256": {"width": 256},
    "ConvNetD1": {"depth": 1}, "ConvNetD2": {"depth": 2}, "ConvNetD3": {"depth": 3}, "ConvNetD4": {"depth": 4},
    "ConvNetBN": {"norm": "batch"}, "ConvNetLN": {"norm": "layer"}, "ConvNetGN": {"norm": "group"},
    "ConvNetNN": {"norm": "none"}, "ConvNetMP": {"pool": "max"}, "ConvNetNP": {"pool": "none"},
    "ConvNetSigmoid": {"act": "sigmoid"}, "ConvNetLeakyReLU": {"act": "leakyrelu"},
}.items():
    register_network(_name, **_kw)(ConvNet)


class _SafePool(nn.Module):
    """2x2 pooling that leaves maps smaller than 2x2 alone (so deep nets accept 8 px inputs)."""

    def __init__(self, kind="max"):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if x.shape[-1] < 2:
            return x
        return F.max_pool2d(x, 2) if self.kind == "max" else F.avg_pool2d(x, 2)


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm, size, avgpool_down):
        super().__init__()
        out_size = size // stride if stride > 1 else size
        conv_stride = 1 if avgpool_down else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, conv_stride, 1, bias=False)
        self.n1 = make_norm(norm, cout, size if avgpool_down else out_size)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = make_norm(norm, cout, out_size)
        self.pool = nn.AvgPool2d(2) if (avgpool_down and stride > 1) else nn.Identity()
        self.short = nn.Identity()
        if stride > 1 or cin != cout:
            if avgpool_down:  # IDC's ResNetAP: 1x1 conv then average-pool instead of a strided conv
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), make_norm(norm, cout, size),
                                           nn.AvgPool2d(2) if stride > 1 else nn.Identity())
            else:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                           make_norm(norm, cout, out_size))

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        out = self.pool(out)
        out = self.n2(self.conv2(out))
        return F.relu(out + self.short(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no stem pooling), as in the DC/IDC code. blocks=(1,1,1,1) is ResNet-10,
    (2,2,2,2) ResNet-18; avgpool_down=True gives IDC's ResNetAP. Stages stop downsampling at 1x1."""

    def __init__(self, channels, num_classes, im_size, blocks=(1, 1, 1, 1), width=64, norm="instance",
                 avgpool_down=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), make_norm(norm, width, im_size),
                                  nn.ReLU())
        layers, cin, size = [], width, im_size
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for b in range(n):
                stride = 2 if (b == 0 and i > 0 and size >= 2) else 1
                layers.append(_BasicBlock(cin, cout, stride, norm, size, avgpool_down))
                size = size // stride
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.feature_dim = cin
        self.classifier = nn.Linear(cin, num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


register_network("ResNet10", blocks=(1, 1, 1, 1))(ResNet)
register_network("ResNetAP10", blocks=(1, 1, 1, 1), avgpool_down=True)(ResNet)
register_network("ResNet18", blocks=(2, 2, 2, 2))(ResNet)
register_network("ResNet10BN", blocks=(1, 1, 1, 1), norm="batch")(ResNet)


class _Sequential(nn.Module):
    """A feature extractor followed by a small head; feature size found with a dummy forward."""

    def __init__(self, features, channels, im_size, head):
        super().__init__()
        self.features = features
        with torch.no_grad():
            dim = self.features(torch.zeros(1, channels, im_size, im_size)).flatten(1).shape[1]
        self.feature_dim = dim
        self.head = head(dim)
        self.classifier = self.head[-1]

    def embed(self, x):
        return self.head[:-1](self.features(x).flatten(1))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@register_network("LeNet")
def lenet(channels, num_classes, im_size):
    """LeNet as in the DC code (first conv padding 2 for 1-channel inputs). Inputs under 16 px get padding 2 in both
    convs so the maps do not vanish (deviation needed for 8 px digits)."""
    small = im_size < 16
    feats = nn.Sequential(nn.Conv2d(channels, 6, 5, padding=2 if (channels == 1 or small) else 0), nn.ReLU(),
                          _SafePool(), nn.Conv2d(6, 16, 5, padding=2 if small else 0), nn.ReLU(), _SafePool())
    return _Sequential(feats, channels, im_size, lambda d: nn.Sequential(
        nn.Linear(d, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)))


@register_network("MLP")
def mlp(channels, num_classes, im_size, width=128):
    return _Sequential(nn.Identity(), channels, im_size, lambda d: nn.Sequential(
        nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes)))


@register_network("AlexNet")
def alexnet(channels, num_classes, im_size):
    """The small AlexNet of the DC code."""
    feats = nn.Sequential(
        nn.Conv2d(channels, 128, 5, padding=4 if channels == 1 else 2), nn.ReLU(), _SafePool(),
        nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(), _SafePool(),
        nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(),
        nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), _SafePool())
    return _Sequential(feats, channels, im_size, lambda d: nn.Sequential(nn.Linear(d, num_classes)))


@register_network("VGG11")
def vgg11(channels, num_classes, im_size, norm="instance"):
    """VGG-11 with instance norm, as the DC code's 'VGG11'."""
    layers, cin, size = [], channels, im_size
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            layers.append(_SafePool())
            size = max(size // 2, 1)
        else:
            pad = 3 if (cin == channels and im_size == 28) else 1
            layers += [nn.Conv2d(cin, v, 3, padding=pad), make_norm(norm, v, size + 2 * pad - 2), nn.ReLU()]
            size = size + 2 * pad - 2
            cin = v
    return _Sequential(nn.Sequential(*layers), channels, im_size,
                       lambda d: nn.Sequential(nn.Linear(d, num_classes)))
