"""ID and feature embedding tables.

Every categorical field (item id, category, two more item features, user profile features) is
mapped by the data pipeline to a dense index in ``[0, size)`` with 0 = padding / unknown, and has
its own table of width ``dim``. An item is represented by its id and category embeddings
concatenated (``2 * dim``), which is what the attentions see.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

#: Item fields, in the order of the last axis of ``batch["target"]``.
ITEM_FIELDS = ("item", "category", "feat_a", "feat_b")
#: Item fields that represent a behaviour in a sequence (``batch["recent"]`` etc. hold these two).
SEQ_FIELDS = ("item", "category")


class FeatureEmbeddings(nn.Module):
    """One embedding table per field, sized by ``vocab_sizes`` (which includes index 0 = padding).

    Args:
        vocab_sizes: field name -> number of rows; needs every name of ``ITEM_FIELDS`` plus the
            user fields (any names, in the order of ``batch["user"]``'s last axis).
        dim: width of each table (D = 16 in the paper).
        sparse_min_rows: tables with at least this many rows get sparse gradients (SparseAdam): on
            Taobao-scale item tables a dense Adam step would touch every row; small tables are
            cheaper dense.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], user_fields: tuple[str, ...], dim: int = 16,
                 sparse_min_rows: int = 1_000_000) -> None:
        super().__init__()
        self.dim = dim
        self.user_fields = tuple(user_fields)
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(int(size), dim, padding_idx=0, sparse=int(size) >= sparse_min_rows)
             for name, size in vocab_sizes.items()}
        )
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()

    @property
    def seq_dim(self) -> int:
        """Width of one behaviour / target item in attention (item + category)."""
        return len(SEQ_FIELDS) * self.dim

    @property
    def target_dim(self) -> int:
        """Width of all target item features concatenated."""
        return len(ITEM_FIELDS) * self.dim

    @property
    def user_dim(self) -> int:
        return len(self.user_fields) * self.dim

    def seq(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [..., 2]`` (item, category indices) -> ``[..., 2D]``."""
        return torch.cat([self.tables[f](ids[..., i]) for i, f in enumerate(SEQ_FIELDS)], dim=-1)

    def target(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, 4]`` (item, category, feat_a, feat_b) -> ``[B, 4D]``."""
        return torch.cat([self.tables[f](ids[..., i]) for i, f in enumerate(ITEM_FIELDS)], dim=-1)

    def user(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, n_user_fields]`` -> ``[B, n_user_fields * D]``."""
        if not self.user_fields:
            return ids.new_zeros((ids.shape[0], 0), dtype=torch.float32)
        return torch.cat([self.tables[f](ids[..., i]) for i, f in enumerate(self.user_fields)], dim=-1)
