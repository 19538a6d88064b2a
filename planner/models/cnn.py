"""A small CNN: stem, stages of conv-bn-relu blocks (some downsampling), pooled head.

>>> CNN(CNNConfig()).eval()(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["CNNConfig", "CNN"]


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 3
    channels: tuple[int, ...] = (16, 32, 32, 64)
    num_classes: int = 10
    image_size: int = 32


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))  # (B, cout, H/stride, W/stride)


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stem = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        widths = (cfg.channels[0], *cfg.channels)
        self.blocks = nn.ModuleList(
            ConvBlock(widths[i], widths[i + 1], stride=2 if widths[i + 1] != widths[i] else 1)
            for i in range(len(cfg.channels))
        )
        self.fc = nn.Linear(cfg.channels[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, C0, H, W)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))  # (B, classes)
