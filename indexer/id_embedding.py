"""The ``id`` source's model: learned item-ID vectors (the no-multimodal baseline)."""

from __future__ import annotations

import numpy as np
import torch

from muse.arrays import lookup_sorted


class IdEmbedding(torch.nn.Module):
    """Learned item-ID vectors: one row per item of the training dataset, unit-normalised on output."""

    def __init__(self, item_ids: np.ndarray, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("item_ids", torch.as_tensor(np.asarray(item_ids, dtype=np.int64)))  # [n] sorted
        self.table = torch.nn.Embedding(len(item_ids), dim)
        torch.nn.init.normal_(self.table.weight, std=0.01)  # small: early updates move directions fast

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row index int64 [n], known bool [n]) of ``item_ids`` in the table."""
        return lookup_sorted(self.item_ids.cpu().numpy(), item_ids)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows ``[B]`` int64 -> ``[B, dim]`` unit vectors."""
        return torch.nn.functional.normalize(self.table(rows), dim=-1)
