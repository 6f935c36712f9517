"""DenseNet-, ResNeXt-, ShuffleNetV2-, SqueezeNet-, EfficientNet- and ConvNeXt-like networks in plain torch.

Small widths (a forward pass on a 1x3x64x64 input takes milliseconds on CPU), but the layer patterns structured
channel pruning has to follow: channel concatenation (dense blocks, fire modules), grouped and depthwise convs,
``chunk`` + ``cat`` + channel shuffle, squeeze-excite gating, and channels-last LayerNorm/Linear with layer scale.
Every ``forward`` is free of data-dependent Python control flow, so the models trace with ``torch.fx``.
"""

from __future__ import annotations

import torch
from torch import nn

from graphopt.zoo.cnn import _randomize_bn


def _conv_bn(cin, cout, k, stride=1, groups=1, act: type | None = nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """``_randomize_bn`` plus non-trivial LayerNorm affines and layer scales (ConvNeXt's start near zero)."""
    _randomize_bn(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, ConvNeXtBlock):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=gen) * 0.5 + 0.25)
    return model.eval()


def _build(make, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize(make(), seed)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=4):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
            nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, blocks=(3, 3, 3), growth=8, stem=16, num_classes=10):
        super().__init__()
        layers, c = [nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                     nn.MaxPool2d(3, 2, 1)], stem
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:  # transition: halve the channels and the resolution
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False),
                           nn.AvgPool2d(2, 2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class ResNeXtBlock(nn.Module):
    def __init__(self, cin, width, cout, stride=1, groups=8):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride, groups=groups),
                                  _conv_bn(width, cout, 1, act=None))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.body(x) + identity)


class ResNeXt(nn.Module):
    # (blocks, grouped-conv width, output channels, stride)
    STAGES = [(2, 32, 64, 1), (1, 64, 128, 2), (1, 128, 256, 2)]

    def __init__(self, num_classes=10, groups=8):
        super().__init__()
        layers, c = [_conv_bn(3, 32, 3, 2), nn.MaxPool2d(3, 2, 1)], 32
        for n, width, cout, stride in self.STAGES:
            for j in range(n):
                layers.append(ResNeXtBlock(c, width, cout, stride if j == 0 else 1, groups))
                c = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(torch.flatten(x, 1))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin, act=None), _conv_bn(cin, half, 1))
        cin2 = cin if stride > 1 else half
        self.branch2 = nn.Sequential(_conv_bn(cin2, half, 1), _conv_bn(half, half, 3, stride, groups=half, act=None),
                                     _conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:  # fixed at construction, not data-dependent
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, channels=(24, 48, 96, 192), repeats=(2, 2, 2), last=256, num_classes=10):
        super().__init__()
        layers, c = [_conv_bn(3, channels[0], 3, 2), nn.MaxPool2d(3, 2, 1)], channels[0]
        for n, cout in zip(repeats, channels[1:]):
            for j in range(n):
                layers.append(ShuffleUnit(c, cout, 2 if j == 0 else 1))
                c = cout
        layers.append(_conv_bn(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean([2, 3]))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        pool = dict(kernel_size=3, stride=2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(**pool),
            Fire(32, 8, 32, 32), Fire(64, 8, 32, 32), nn.MaxPool2d(**pool),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(**pool),
            Fire(128, 24, 96, 96), Fire(192, 24, 96, 96), Fire(192, 32, 128, 128), Fire(256, 32, 128, 128))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(256, num_classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class SqueezeExcite(nn.Module):
    def __init__(self, c, reduced):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, reduced, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(reduced, c, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.SiLU)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, max(1, cin // 4)), _conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNet(nn.Module):
    # (expansion, channels, repeats, stride), EfficientNet-B0's first stages at smaller widths
    SETTINGS = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 40, 2, 2), (4, 80, 1, 2)]

    def __init__(self, num_classes=10, head=256):
        super().__init__()
        layers, c = [_conv_bn(3, 16, 3, 2, act=nn.SiLU)], 16
        for t, cout, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(MBConv(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(_conv_bn(c, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor, written as permute -> LayerNorm -> permute."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=eps)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32, 64), depths=(2, 2, 2), num_classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0])]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.norm(self.features(x).mean([-2, -1])))


def densenet_like(num_classes=10, seed=0) -> nn.Module:
    """Dense blocks (pre-activation BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, concatenated) and transition layers."""
    return _build(lambda: DenseNet(num_classes=num_classes), seed)


def resnext_like(num_classes=10, seed=0) -> nn.Module:
    """Bottleneck blocks whose 3x3 conv has 8 groups, with residual Adds and 1x1 downsample branches."""
    return _build(lambda: ResNeXt(num_classes), seed)


def shufflenet_v2_like(num_classes=10, seed=0) -> nn.Module:
    """ShuffleNetV2 units: chunk + branch + cat + channel shuffle (view/transpose/view), two-branch stride-2 units."""
    return _build(lambda: ShuffleNetV2(num_classes=num_classes), seed)


def squeezenet_like(num_classes=10, seed=0) -> nn.Module:
    """SqueezeNet 1.1's layout at half width: fire modules (squeeze, concatenated 1x1/3x3 expands), conv classifier."""
    return _build(lambda: SqueezeNet(num_classes), seed)


def efficientnet_like(num_classes=10, seed=0) -> nn.Module:
    """MBConv blocks: expand, depthwise, squeeze-excite gate (Mul), project, residual Add; SiLU throughout."""
    return _build(lambda: EfficientNet(num_classes), seed)


def convnext_like(num_classes=10, seed=0) -> nn.Module:
    """ConvNeXt blocks (depthwise 7x7, channels-last LayerNorm + Linear MLP, layer scale), patchify stem."""
    return _build(lambda: ConvNeXt(num_classes=num_classes), seed)
