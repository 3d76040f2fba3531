"""Gated ResNets: CIFAR-style (ResNet-20/32/56/110, option-A shortcuts) and ImageNet-style (18/34/50)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from cap.core.blocks import BasicBlock, Bottleneck, GatedBlock, RemovedBlock, conv_bn
from cap.models.registry import register_model


class GatedResNet(nn.Module):
    """stem -> stages of gated blocks -> global average pool -> linear classifier."""

    def __init__(self, stem: nn.Module, stages: list[list[nn.Module]], feature_dim: int, num_classes: int,
                 in_channels: int, input_size: int) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(nn.ModuleList(blocks) for blocks in stages)
        self.fc = nn.Linear(feature_dim, num_classes)
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        self.record_spatial_sizes()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.fc(x.mean((2, 3)))  # = adaptive_avg_pool2d(x, 1), whose CUDA backward is nondeterministic

    def blocks(self) -> Iterator[GatedBlock]:
        """The live (not removed) gated blocks, in forward order."""
        for stage in self.stages:
            for block in stage:
                if not block.is_removed:
                    yield block

    def block_slots(self) -> Iterator[tuple[int, int, nn.Module]]:
        """(stage, index, block) for every block position, removed ones included."""
        for s, stage in enumerate(self.stages):
            for i, block in enumerate(stage):
                yield s, i, block

    def replace_block(self, block: GatedBlock, new: nn.Module) -> None:
        for s, i, b in self.block_slots():
            if b is block:
                self.stages[s][i] = new
                return
        raise KeyError("block not found in model")

    @torch.no_grad()
    def record_spatial_sizes(self) -> None:
        """Store each conv's output H*W (`conv.out_hw`): the complexity counter needs it."""
        hooks = [m.register_forward_hook(lambda mod, _i, out: setattr(mod, "out_hw", out.shape[2] * out.shape[3]))
                 for m in self.modules() if isinstance(m, nn.Conv2d)]
        was_training = self.training
        self.eval()
        try:
            self(torch.zeros(1, self.in_channels, self.input_size, self.input_size))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)


def _cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                  input_size: int = 32) -> GatedResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    conv, bn = conv_bn(in_channels, width, 3)
    stem = nn.Sequential(conv, bn, nn.ReLU(inplace=True))
    stages, cin = [], width
    for s, cout in enumerate([width, 2 * width, 4 * width]):
        blocks = []
        for i in range(n):
            stride = 2 if (s > 0 and i == 0) else 1
            blocks.append(BasicBlock(cin, cout, stride, shortcut="A"))
            cin = cout
        stages.append(blocks)
    return GatedResNet(stem, stages, cin, num_classes, in_channels, input_size)


def _imagenet_resnet(layers: list[int], bottleneck: bool, num_classes: int = 1000, in_channels: int = 3,
                     input_size: int = 224) -> GatedResNet:
    conv = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    stem = nn.Sequential(conv, nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    stages, cin = [], 64
    for s, (planes, count) in enumerate(zip([64, 128, 256, 512], layers, strict=True)):
        blocks = []
        for i in range(count):
            stride = 2 if (s > 0 and i == 0) else 1
            if bottleneck:
                blocks.append(Bottleneck(cin, planes, stride))
                cin = planes * Bottleneck.expansion
            else:
                blocks.append(BasicBlock(cin, planes, stride, shortcut="B"))
                cin = planes
        stages.append(blocks)
    return GatedResNet(stem, stages, cin, num_classes, in_channels, input_size)


@register_model
def resnet20(**kw) -> GatedResNet:
    return _cifar_resnet(20, **kw)


@register_model
def resnet32(**kw) -> GatedResNet:
    return _cifar_resnet(32, **kw)


@register_model
def resnet56(**kw) -> GatedResNet:
    return _cifar_resnet(56, **kw)


@register_model
def resnet110(**kw) -> GatedResNet:
    return _cifar_resnet(110, **kw)


@register_model
def resnet18(**kw) -> GatedResNet:
    return _imagenet_resnet([2, 2, 2, 2], bottleneck=False, **kw)


@register_model
def resnet34(**kw) -> GatedResNet:
    return _imagenet_resnet([3, 4, 6, 3], bottleneck=False, **kw)


@register_model
def resnet50(**kw) -> GatedResNet:
    return _imagenet_resnet([3, 4, 6, 3], bottleneck=True, **kw)


__all__ = ["GatedResNet", "RemovedBlock"]
