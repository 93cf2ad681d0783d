"""The seed article's SimpleResNet, with its depth, widths and skip connections as parameters.

Module names follow the seed (conv1, bn1, layer1..N, fc), so the default configuration is the
seed's network parameter for parameter: 175,258 of them. With `residual=False` every shortcut,
the 1x1 projections included, is removed: the "plain" network of the ResNet paper.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, residual: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.residual = residual
        self.shortcut: nn.Module | None = None
        if residual:
            self.shortcut = nn.Sequential()
            if stride != 1 or in_channels != out_channels:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)


class SimpleResNet(nn.Module):
    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2),
        widths: Sequence[int] = (16, 32, 64),
        residual: bool = True,
        num_classes: int = 10,
    ):
        super().__init__()
        if not blocks_per_stage or len(blocks_per_stage) != len(widths):
            raise ValueError("blocks_per_stage and widths need the same, non-zero number of stages")
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        self.stages: list[str] = []
        for i, (blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(*[
                BasicBlock(in_channels if b == 0 else width, width, stride if b == 0 else 1, residual)
                for b in range(blocks)
            ])
            self.add_module(f"layer{i + 1}", layer)
            self.stages.append(f"layer{i + 1}")
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stages:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def stage(self, index: int) -> nn.Module:
        """Stage `index` (0-based; -1 is the last), for per-stage gradient norms."""
        return getattr(self, self.stages[index])


def build_model(cfg, num_classes: int = 10) -> SimpleResNet:
    """A SimpleResNet from a ModelConfig (or anything with blocks_per_stage, widths, residual)."""
    return SimpleResNet(cfg.blocks_per_stage, cfg.widths, cfg.residual, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each float32 [1, 3, 1, 1], such that x * scale - shift == (x / 255 - mean) / std
    for pixel values x: the model's input normalization as one multiply and one subtract."""
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = 1.0 / (255.0 * std_t)
    shift = torch.tensor(mean, dtype=torch.float32) / std_t
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)
