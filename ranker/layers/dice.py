"""Dice: DIN's data-adaptive activation, ``p(x) * x + (1 - p(x)) * alpha * x`` with
``p(x) = sigmoid(BatchNorm(x))`` (no affine) and a learned ``alpha`` per unit."""

from __future__ import annotations

import torch
from torch import nn


class Dice(nn.Module):
    """Dice over the last axis of ``x [B, H]``."""

    def __init__(self, width: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width, affine=False, eps=eps)
        self.alpha = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.norm(x))  # [B, H]
        return p * x + (1.0 - p) * self.alpha * x
