"""The shared CTR model: every model assembles the same parts and differs only in its long-sequence
search (GSU) and the features it extracts from the retrieved behaviours (ESU).

Batch contract (a dict of tensors built by :mod:`ranker.data`; B = batch, R = recent length,
K = retrieved behaviours, L = padded history length):

- ``user`` int64 ``[B, n_user_fields]``; ``target`` int64 ``[B, 4]`` (item, category, feat_a, feat_b);
- ``recent`` int64 ``[B, R, 2]`` (item, category), ``recent_mask`` bool ``[B, R]``;
- retrieval ``"category"`` and ``"multimodal"``: ``long`` int64 ``[B, K, 2]``, ``long_mask`` ``[B, K]``;
- retrieval ``"history"``: ``history`` int64 ``[B, L, 2]``, ``history_mask`` bool ``[B, L]``;
- with an item-vector table (every model whose ESU uses multimodal similarities, and MUSE):
  ``recent_sim`` ``[B, R]`` and ``recent_sim_mask`` ``[B, R]`` (the recent behaviour and the target
  have vectors); ``long_sim`` ``[B, K]`` (and ``long_sim_mask``) for ``category``/``multimodal``;
  ``history_sim`` / ``history_sim_mask`` ``[B, L]`` for ``history`` (the model gathers its top K).
  Similarities are multimodal cosines; a behaviour without a vector has similarity 0 in SA-TA and
  is left out of SimTier's counts;
- ``label`` float ``[B]`` (training/evaluation only).

``forward(batch)`` returns ``{"logit": [B], "prob": [B]}``.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ranker.layers import (
    DotProductTargetAttention,
    FeatureEmbeddings,
    MLPTower,
    SemanticAwareTargetAttention,
    SimTier,
    masked_mean,
)
from ranker.models.config import FeatureSpec, ModelConfig


class NeedsVectors:
    """``model.needs_vectors``: whether its batches need an item-vector table (multimodal GSU or
    similarities in the ESU). On the class (``model_class("din").needs_vectors``) it answers for
    the model's default config, the paper's set-up."""

    def __get__(self, obj: CTRModel | None, cls: type[CTRModel]) -> bool:
        if obj is None:
            from ranker.models.registry import make_config

            return make_config(cls.name).needs_vectors
        return obj.config.needs_vectors


class CTRModel(nn.Module):
    """Embeddings + short-sequence attention + long path (GSU + ESU) + MLP tower.

    Subclasses set ``name`` and ``retrieval`` and may override :meth:`build_short` and
    :meth:`retrieve` (their GSU); the ESU is built from ``config.esu`` for every model:
    attention over the K retrieved behaviours (``ta`` ID-only, ``sa-ta`` fused with the multimodal
    similarity), a mean-pool of them, SimTier over their similarities and SimTier over the recent
    behaviours' similarities. The tower width is the sum of the parts' widths.
    """

    name: ClassVar[str] = ""
    retrieval: ClassVar[str] = "none"

    def __init__(self, config: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.embeddings = FeatureEmbeddings(spec.vocab_sizes, spec.user_fields, config.emb_dim,
                                            sparse_min_rows=config.sparse_min_rows)
        seq_dim = self.embeddings.seq_dim
        self.short_attention = self.build_short(seq_dim)
        long_dim = self.build_long(seq_dim)
        self.simtier_recent = SimTier(config.n_tiers, config.simtier_init) if config.uses_simtier else None
        width = (
            self.short_attention.out_dim  # attention over the recent behaviours
            + seq_dim  # mean-pool of the recent behaviours
            + self.embeddings.target_dim  # target item features
            + self.embeddings.user_dim  # user profile features
            + long_dim  # long-sequence features
            + (config.n_tiers if config.uses_simtier else 0)  # SimTier of the recent behaviours
        )
        self.tower = MLPTower(width, config.tower, config.activation)

    needs_vectors = NeedsVectors()

    @property
    def esu(self) -> str:
        return self.config.esu

    def build_short(self, seq_dim: int) -> nn.Module:
        """The attention over the recent behaviours (dot-product target attention by default)."""
        return DotProductTargetAttention(seq_dim)

    def build_long(self, seq_dim: int) -> int:
        """Create the ESU modules of the long path; return the width of :meth:`long_features`' output."""
        if self.retrieval == "none":
            return 0
        cfg = self.config
        width = seq_dim  # mean-pool of the retrieved behaviours
        self.long_attention: nn.Module | None = None
        if cfg.attention == "sa-ta":
            self.long_attention = SemanticAwareTargetAttention(seq_dim, temperature=cfg.temperature)
        elif cfg.attention == "ta":
            self.long_attention = DotProductTargetAttention(seq_dim)
        if self.long_attention is not None:
            width += self.long_attention.out_dim
        self.simtier_long = SimTier(cfg.n_tiers, cfg.simtier_init) if cfg.uses_simtier else None
        if self.simtier_long is not None:
            width += self.simtier_long.out_dim
        return width

    def retrieve(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> Retrieved:
        """The GSU: the K retrieved behaviours (done by the data pipeline unless overridden)."""
        mask = batch["long_mask"]
        return Retrieved(batch["long"], mask, batch.get("long_sim"), batch.get("long_sim_mask", mask))

    def long_features(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        """Features ``[B, *]`` from the long sequence, given the target representation ``[B, 2D]``."""
        if self.retrieval == "none":
            return []
        got = self.retrieve(batch, target)
        seq = self.embeddings.seq(got.ids)  # [B, K, 2D]
        out = [masked_mean(seq, got.mask)]
        if isinstance(self.long_attention, SemanticAwareTargetAttention):
            sim = torch.where(got.sim_mask, got.sim, torch.zeros_like(got.sim))  # no vector: neutral 0
            out.append(self.long_attention(target, seq, sim, got.mask))
        elif self.long_attention is not None:
            out.append(self.long_attention(target, seq, got.mask))
        if self.simtier_long is not None:
            out.append(self.simtier_long(got.sim, got.sim_mask))  # [B, n_tiers]
        return out

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
        if self.simtier_recent is not None:
            parts.append(self.simtier_recent(batch["recent_sim"], batch["recent_sim_mask"]))  # [B, n_tiers]
        logit = self.tower(torch.cat(parts, dim=-1))  # [B]
        return {"logit": logit, "prob": torch.sigmoid(logit)}

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding tables (trained with the embedding learning rate; large ones have sparse gradients)."""
        return list(self.embeddings.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an embedding table."""
        emb = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in emb]


class Retrieved(NamedTuple):
    """What a GSU hands the ESU: ids ``[B, K, 2]``, mask ``[B, K]``, multimodal similarities
    ``[B, K]`` (None when the ESU uses none) and their mask (behaviour and target have vectors)."""

    ids: torch.Tensor
    mask: torch.Tensor
    sim: torch.Tensor | None
    sim_mask: torch.Tensor | None


def retrieved_from_history(batch: dict[str, torch.Tensor], indices: torch.Tensor, valid: torch.Tensor) -> Retrieved:
    """The behaviours of ``batch["history"]`` at ``indices [B, K]`` (with their similarities if the
    batch has them)."""
    ids = gather_retrieved(batch["history"], indices)
    sim = sim_mask = None
    if "history_sim" in batch:
        sim = torch.gather(batch["history_sim"], 1, indices)
        sim_mask = torch.gather(batch["history_sim_mask"], 1, indices) & valid
    return Retrieved(ids, valid, sim, sim_mask)


def gather_retrieved(
    ids: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """``ids [B, L, F]`` gathered at ``indices [B, K]`` -> ``[B, K, F]``."""
    return torch.gather(ids, 1, indices.unsqueeze(-1).expand(-1, -1, ids.shape[-1]))
