"""The MLP tower: features ``[B, in_dim]`` -> click logit ``[B]``."""

from __future__ import annotations

import torch
from torch import nn

from muse.errors import ConfigurationError
from ranker.layers.dice import Dice

#: Activations the tower accepts by name.
ACTIVATIONS = ("dice", "relu", "prelu")


def _activation(name: str, width: int) -> nn.Module:
    if name == "dice":
        return Dice(width)
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(width)
    raise ConfigurationError(f"activation {name!r} is unknown; valid: {', '.join(ACTIVATIONS)}")


class MLPTower(nn.Module):
    """Linear -> activation for each hidden width, then a Linear to one logit."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (256, 128, 64), activation: str = "dice") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation, h)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # [B]
