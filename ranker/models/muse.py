"""MUSE: multimodal GSU (done by the data pipeline or the retriever with the same kernels), then an
ESU of SA-TA and/or SimTier over the top K, plus SimTier over the recent behaviours."""

from __future__ import annotations

import torch

from ranker.layers import DotProductTargetAttention, SemanticAwareTargetAttention, SimTier, masked_mean
from ranker.models.base import CTRModel
from ranker.models.config import MUSEConfig


class MUSE(CTRModel):
    name = "muse"
    retrieval = "multimodal"
    needs_vectors = True
    config: MUSEConfig

    def build_long(self, seq_dim: int) -> int:
        cfg = self.config
        width = seq_dim  # mean-pool of the retrieved behaviours
        self.long_attention: torch.nn.Module | None = None
        if cfg.attention == "sa-ta":
            self.long_attention = SemanticAwareTargetAttention(seq_dim, temperature=cfg.temperature)
        elif cfg.attention == "ta":
            self.long_attention = DotProductTargetAttention(seq_dim)
        if self.long_attention is not None:
            width += self.long_attention.out_dim
        self.simtier_long = SimTier(cfg.n_tiers, cfg.simtier_init) if cfg.uses_simtier else None
        self.simtier_recent = SimTier(cfg.n_tiers, cfg.simtier_init) if cfg.uses_simtier else None
        if cfg.uses_simtier:
            width += self.simtier_long.out_dim + self.simtier_recent.out_dim
        return width

    def long_features(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        mask, sim = batch["long_mask"], batch["long_sim"]  # [B, K], [B, K]
        seq = self.embeddings.seq(batch["long"])  # [B, K, 2D]
        out = [masked_mean(seq, mask)]
        if isinstance(self.long_attention, SemanticAwareTargetAttention):
            out.append(self.long_attention(target, seq, sim, mask))
        elif self.long_attention is not None:
            out.append(self.long_attention(target, seq, mask))
        if self.simtier_long is not None:
            out.append(self.simtier_long(sim, mask))  # [B, n_tiers]
            out.append(self.simtier_recent(batch["recent_sim"], batch["recent_sim_mask"]))  # [B, n_tiers]
        return out
