"""Small ResNet-style models that ibnify can build by name (source ``ibnify:``).

They exist for the digits demo, the tests and the benchmarks: a CIFAR-style ResNet (3×3 stride-1
stem, no max-pool) with torchvision's ``BasicBlock`` and ``layer1..layerN`` names, so the ResNet
layouts apply and ``ibnify.load`` can rebuild a checkpoint from its ``ibnify:NAME`` recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

__all__ = ["MODELS", "DigitsResNet", "digits_resnet"]

# Statistics of the 16×16 digits images (ibnify.data.load_digits_images): what timm's
# resolve_data_config reads from ``pretrained_cfg`` to normalise inputs.
DIGITS_MEAN = (0.3443, 0.3150, 0.2857)
DIGITS_STD = (0.2551, 0.2245, 0.1939)


class DigitsResNet(nn.Module):
    """A small CIFAR-style ResNet: 3×3 stem, ``len(blocks)`` stages of BasicBlocks, linear head.

    Args:
        num_classes: classifier outputs.
        width: channels of stage 1; each later stage doubles them.
        blocks: BasicBlocks per stage.
        in_chans: input channels.
        image_size: the input side length recorded in ``pretrained_cfg``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
        in_chans: int = 3,
        image_size: int = 16,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for index, count in enumerate(blocks, start=1):
            planes = width * 2 ** (index - 1)
            stride = 1 if index == 1 else 2
            layers: list[nn.Module] = []
            for block in range(count):
                downsample = None
                if block == 0 and (stride != 1 or inplanes != planes):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(planes),
                    )
                layers.append(BasicBlock(inplanes, planes, stride if block == 0 else 1, downsample))
                inplanes = planes
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.pretrained_cfg = {
            "input_size": (in_chans, image_size, image_size),
            "mean": DIGITS_MEAN,
            "std": DIGITS_STD,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": num_classes,
        }
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def digits_resnet(num_classes: int = 10, **kwargs) -> DigitsResNet:
    """The demo's baseline: widths 16/32/64, one BasicBlock per stage, 16×16 inputs."""
    return DigitsResNet(num_classes=num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {"digits_resnet": digits_resnet}
