"""A residual MLP: input projection, repeated blocks, output head.

>>> MLP(MLPConfig(in_features=16, hidden=32, out_features=4, num_blocks=2))(torch.zeros(3, 16)).shape
torch.Size([3, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["MLPConfig", "MLP"]


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 256
    hidden: int = 1024
    out_features: int = 10
    num_blocks: int = 4
    expansion: int = 4


class MLPBlock(nn.Module):
    def __init__(self, width: int, expansion: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, expansion * width)
        self.down = nn.Linear(expansion * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))  # (B, ..., width)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.proj_in = nn.Linear(cfg.in_features, cfg.hidden)
        self.blocks = nn.ModuleList(MLPBlock(cfg.hidden, cfg.expansion) for _ in range(cfg.num_blocks))
        self.head = nn.Linear(cfg.hidden, cfg.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
