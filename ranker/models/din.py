"""DIN: the DIN activation unit over the recent behaviours; no long-sequence search."""

from __future__ import annotations

from torch import nn

from ranker.layers import DinAttention
from ranker.models.base import CTRModel
from ranker.models.config import DINConfig


class DIN(CTRModel):
    name = "din"
    retrieval = "none"
    config: DINConfig

    def build_short(self, seq_dim: int) -> nn.Module:
        return DinAttention(seq_dim, self.config.din_hidden)
