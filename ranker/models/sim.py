"""SIM: hard search (same-category behaviours, most recent K; done by the data pipeline) and soft
search (top K by cosine of the model's own learned item embeddings; done in the model)."""

from __future__ import annotations

import torch

from ranker.models.base import RetrievedTargetAttention, gather_retrieved


class SIMHard(RetrievedTargetAttention):
    """Target attention over the K most recent behaviours of the target's category."""

    name = "sim-hard"
    retrieval = "category"


class SIMSoft(RetrievedTargetAttention):
    """Target attention over the top K behaviours by cosine of learned (item, category) embeddings."""

    name = "sim-soft"
    retrieval = "history"

    def retrieve(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from retriever.kernels import gsu_topk

        ids, mask = batch["history"], batch["history_mask"]  # [B, L, 2], [B, L]
        with torch.no_grad():  # the search is not differentiable; only the ESU learns from it
            hist = self.embeddings.seq(ids)  # [B, L, 2D]
            top = gsu_topk(target.detach(), hist, min(self.config.k, ids.shape[1]), valid=mask)
        return gather_retrieved(ids, top.indices), top.valid
