"""The shared CTR model: every model assembles the same parts and differs only in its long-sequence
search (GSU) and the features it extracts from the retrieved behaviours (ESU).

Batch contract (a dict of tensors built by :mod:`ranker.data`; B = batch, R = recent length,
K = retrieved behaviours, L = padded history length):

- ``user`` int64 ``[B, n_user_fields]``; ``target`` int64 ``[B, 4]`` (item, category, feat_a, feat_b);
- ``recent`` int64 ``[B, R, 2]`` (item, category), ``recent_mask`` bool ``[B, R]``;
- retrieval ``"category"`` and ``"multimodal"``: ``long`` int64 ``[B, K, 2]``, ``long_mask`` ``[B, K]``;
  ``"multimodal"`` adds ``long_sim`` ``[B, K]``, ``recent_sim`` ``[B, R]`` (multimodal cosines) and
  ``recent_sim_mask`` ``[B, R]`` (the recent behaviour has a vector);
- retrieval ``"history"``: ``history`` int64 ``[B, L, 2]``, ``history_mask`` bool ``[B, L]``;
- ``label`` float ``[B]`` (training/evaluation only).

``forward(batch)`` returns ``{"logit": [B], "prob": [B]}``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ranker.layers import DotProductTargetAttention, FeatureEmbeddings, MLPTower, masked_mean
from ranker.models.config import FeatureSpec, ModelConfig

#: What the data pipeline must put in the batch for a model's long-sequence path.
RETRIEVALS = ("none", "category", "multimodal", "history")


class CTRModel(nn.Module):
    """Embeddings + short-sequence attention + (model-specific) long path + MLP tower.

    Subclasses set ``name`` and ``retrieval`` and override :meth:`build_long` /
    :meth:`long_features`; the tower width is the sum of the parts' widths.
    """

    name: ClassVar[str] = ""
    retrieval: ClassVar[str] = "none"
    needs_vectors: ClassVar[bool] = False  # True: the pipeline needs an embedding source

    def __init__(self, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.embeddings = FeatureEmbeddings(spec.vocab_sizes, spec.user_fields, config.emb_dim,
                                            sparse_min_rows=config.sparse_min_rows)
        seq_dim = self.embeddings.seq_dim
        self.short_attention = self.build_short(seq_dim)
        long_dim = self.build_long(seq_dim)
        width = (
            self.short_attention.out_dim  # attention over the recent behaviours
            + seq_dim  # mean-pool of the recent behaviours
            + self.embeddings.target_dim  # target item features
            + self.embeddings.user_dim  # user profile features
            + long_dim  # long-sequence features of the subclass
        )
        self.tower = MLPTower(width, config.tower, config.activation)

    def build_short(self, seq_dim: int) -> nn.Module:
        """The attention over the recent behaviours (dot-product target attention by default)."""
        return DotProductTargetAttention(seq_dim)

    def build_long(self, seq_dim: int) -> int:
        """Create the long-path modules; return the width of :meth:`long_features`' output."""
        return 0

    def long_features(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """Features ``[B, *]`` from the long sequence, given the target representation ``[B, 2D]``."""
        return []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        emb = self.embeddings
        target = emb.seq(batch["target"][:, :2])  # [B, 2D]
        recent = emb.seq(batch["recent"])  # [B, R, 2D]
        recent_mask = batch["recent_mask"]  # [B, R]
        parts = [
            self.short_attention(target, recent, recent_mask),  # [B, d_short]
            masked_mean(recent, recent_mask),  # [B, 2D]
            emb.target(batch["target"]),  # [B, 4D]
            emb.user(batch["user"]),  # [B, n_user * D]
            *self.long_features(batch, target),
        ]
        logit = self.tower(torch.cat(parts, dim=-1))  # [B]
        return {"logit": logit, "prob": torch.sigmoid(logit)}

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding tables (trained with the embedding learning rate; large ones have sparse gradients)."""
        return list(self.embeddings.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an embedding table."""
        emb = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in emb]


class RetrievedTargetAttention(CTRModel):
    """A model whose long path is target attention + mean-pool over ``K`` retrieved behaviours.

    Subclasses implement :meth:`retrieve` returning the retrieved ids ``[B, K, 2]`` and mask.
    """

    def build_long(self, seq_dim: int) -> int:
        self.long_attention = DotProductTargetAttention(seq_dim)
        return self.long_attention.out_dim + seq_dim

    def retrieve(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, K, 2], mask [B, K])`` of the retrieved behaviours."""
        return batch["long"], batch["long_mask"]

    def long_features(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        ids, mask = self.retrieve(batch, target)
        seq = self.embeddings.seq(ids)  # [B, K, 2D]
        return [self.long_attention(target, seq, mask), masked_mean(seq, mask)]


def gather_retrieved(
    ids: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """``ids [B, L, F]`` gathered at ``indices [B, K]`` -> ``[B, K, F]``."""
    return torch.gather(ids, 1, indices.unsqueeze(-1).expand(-1, -1, ids.shape[-1]))
