"""The ResNet family, with torchvision's module names so its checkpoints load unchanged.

One configurable :class:`ResNet`; each variant is a registered function that only supplies
arguments (timm's pattern). ``state_dict()`` keys and shapes are identical to
``torchvision.models.<arch>()`` for the same ``num_classes``; ``in_chans`` changes only
``conv1.weight``'s second dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ARCHS", "ResNet", "UnknownArch", "build_model", "register"]


class UnknownArch(ValueError):
    pass


def _conv3x3(inp: int, out: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        inp, out, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    # torchvision's V1.5 bottleneck: the stride sits on the 3x3 convolution.
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_chans: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        channels: tuple[int, int, int, int] = (64, 128, 256, 512),
    ) -> None:
        """``channels``: planes of the stem and the four stages (timm's name); every
        registered arch uses torchvision's, smaller ones make tiny test models."""
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.inplanes = channels[0]
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(
            in_chans, channels[0], kernel_size=7, stride=2, padding=3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, channels[0], layers[0])
        self.layer2 = self._make_layer(block, channels[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, channels[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, channels[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels[3] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)
        ]
        self.inplanes = planes * block.expansion
        layers += [
            block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[..., ResNet]


ARCHS: dict[str, ArchSpec] = {}


def register(name: str) -> Callable[[Callable[..., ResNet]], Callable[..., ResNet]]:
    def wrap(fn: Callable[..., ResNet]) -> Callable[..., ResNet]:
        ARCHS[name] = ArchSpec(name, fn)
        return fn

    return wrap


@register("resnet18")
def resnet18(**kw: Any) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


@register("resnet34")
def resnet34(**kw: Any) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kw)


@register("resnet50")
def resnet50(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


@register("resnet101")
def resnet101(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), **kw)


@register("resnet152")
def resnet152(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), **kw)


@register("resnext50_32x4d")
def resnext50_32x4d(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4, **kw)


@register("resnext101_32x8d")
def resnext101_32x8d(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8, **kw)


@register("wide_resnet50_2")
def wide_resnet50_2(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width_per_group=128, **kw)


@register("wide_resnet101_2")
def wide_resnet101_2(**kw: Any) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), width_per_group=128, **kw)


def build_model(arch: str, num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    """Instantiate a registered architecture (random weights), or raise UnknownArch."""
    try:
        spec = ARCHS[arch]
    except KeyError:
        raise UnknownArch(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}") from None
    return spec.build(num_classes=num_classes, in_chans=in_chans)
