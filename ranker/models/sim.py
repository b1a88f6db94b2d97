"""SIM: hard search (same-category behaviours, most recent K; done by the data pipeline) and soft
search (top K by cosine of the model's own learned item embeddings; done in the model). Both then
run the ESU of ``config.esu``: by default MUSE's (SA-TA + SimTier over the multimodal similarities
of what they retrieved), as the paper sets them up; ``esu="ta"`` is the classic ID-only SIM."""

from __future__ import annotations

import torch

from ranker.models.base import CTRModel, Retrieved, retrieved_from_history


class SIMHard(CTRModel):
    """The K most recent behaviours of the target's category (from the pipeline), then the ESU."""

    name = "sim-hard"
    retrieval = "category"


class SIMSoft(CTRModel):
    """The top K behaviours by cosine of learned (item, category) embeddings, then the ESU."""

    name = "sim-soft"
    retrieval = "history"

    def retrieve(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> Retrieved:
        from retriever.kernels import gsu_topk

        ids, mask = batch["history"], batch["history_mask"]  # [B, L, 2], [B, L]
        with torch.no_grad():  # the search is not differentiable; only the ESU learns from it
            hist = self.embeddings.seq(ids)  # [B, L, 2D]
            top = gsu_topk(target.detach(), hist, min(self.config.k, ids.shape[1]), valid=mask)
        return retrieved_from_history(batch, top.indices, top.valid)
