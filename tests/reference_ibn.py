"""Hand-written IBN-Net reference architectures, independent of ibnify's converter.

They follow the layout of the IBN-Net authors' code (ResNet-IBN-a/b, DenseNet-IBN-a): the
state-dict keys and shapes of these modules are those of the published checkpoints. The tests
compare ibnify's converted torchvision models against them.
"""

from __future__ import annotations

import torch
from torch import nn


class ReferenceIBN(nn.Module):
    """The authors' IBN: IN on the first ``int(planes * ratio)`` channels, BN on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, [self.half, x.shape[1] - self.half], 1)
        return torch.cat((self.IN(first), self.BN(second)), 1)


class ReferenceDenseIBN(nn.Module):
    """The authors' DenseNet IBN: BN on the first ``int(planes * (1 - ratio))`` channels."""

    def __init__(self, planes: int, ratio: float = 0.4) -> None:
        super().__init__()
        self.half = int(planes * (1 - ratio))
        self.BN = nn.BatchNorm2d(self.half)
        self.IN = nn.InstanceNorm2d(planes - self.half, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, [self.half, x.shape[1] - self.half], 1)
        return torch.cat((self.BN(first), self.IN(second)), 1)


class BasicBlockIBN(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, ibn=None, stride=1, downsample=None, groups=1, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = ReferenceIBN(planes) if ibn == "a" else nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.IN = nn.InstanceNorm2d(planes, affine=True) if ibn == "b" else None
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + identity
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


class BottleneckIBN(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, ibn=None, stride=1, downsample=None, groups=1, width=64):
        super().__init__()
        mid = int(planes * (width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False)
        self.bn1 = ReferenceIBN(mid) if ibn == "a" else nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.IN = nn.InstanceNorm2d(planes * 4, affine=True) if ibn == "b" else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


class ResNetIBN(nn.Module):
    """ResNet-IBN with the authors' module names (conv1, bn1, layer1..4, fc)."""

    def __init__(
        self, block, layers, ibn_cfg=("a", "a", "a", None), groups=1, width=64, num_classes=1000
    ):
        super().__init__()
        self.inplanes = 64
        self.groups, self.width = groups, width
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.InstanceNorm2d(64, affine=True) if ibn_cfg[0] == "b" else nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, ibn_cfg[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, ibn_cfg[1])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, ibn_cfg[2])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, ibn_cfg[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride, ibn):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        kwargs = {"groups": self.groups, "width": self.width}
        block_ibn = None if ibn == "b" else ibn
        layers = [block(self.inplanes, planes, block_ibn, stride, downsample, **kwargs)]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            last_b = ibn == "b" and i == blocks - 1
            layers.append(block(self.inplanes, planes, "b" if last_b else block_ibn, **kwargs))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_ibn(depth: int, layout: str = "a", groups: int = 1, width: int = 64) -> ResNetIBN:
    """ResNet-{18,34,50,101,152}-IBN-{a,b}, optionally ResNeXt/wide via ``groups``/``width``."""
    blocks = {
        18: [2, 2, 2, 2],
        34: [3, 4, 6, 3],
        50: [3, 4, 6, 3],
        101: [3, 4, 23, 3],
        152: [3, 8, 36, 3],
    }[depth]
    block = BasicBlockIBN if depth < 50 else BottleneckIBN
    cfg = ("a", "a", "a", None) if layout == "a" else ("b", "b", None, None)
    return ResNetIBN(block, blocks, cfg, groups=groups, width=width)


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, ibn):
        super().__init__()
        self.norm1 = (
            ReferenceDenseIBN(num_input_features, 0.4)
            if ibn
            else nn.BatchNorm2d(num_input_features)
        )
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseNetIBN(nn.Module):
    """DenseNet-IBN-a with torchvision's module names (features.denseblockK.denselayerJ...)."""

    def __init__(self, block_config=(6, 12, 24, 16), growth_rate=32, init_features=64, bn_size=4):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, init_features, 7, 2, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        channels = init_features
        for b, num_layers in enumerate(block_config):
            block = nn.ModuleDict()
            for j in range(num_layers):
                ibn = b < 3 and j % 3 == 0
                layer = _DenseLayer(channels + j * growth_rate, growth_rate, bn_size, ibn)
                block.add_module(f"denselayer{j + 1}", layer)
            self.features.add_module(f"denseblock{b + 1}", block)
            channels += num_layers * growth_rate
            if b != len(block_config) - 1:
                transition = nn.Sequential()
                transition.add_module("norm", nn.BatchNorm2d(channels))
                transition.add_module("relu", nn.ReLU(inplace=True))
                transition.add_module("conv", nn.Conv2d(channels, channels // 2, 1, bias=False))
                transition.add_module("pool", nn.AvgPool2d(2, 2))
                self.features.add_module(f"transition{b + 1}", transition)
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, 1000)


def state_dict_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key → shape of a module's state dict."""
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}
