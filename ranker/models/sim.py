"""SIM: hard search (same-category behaviours, most recent K; done by the data pipeline) and soft
search (top K by cosine of the model's own learned item embeddings; done in the model). Both then
run the ESU of ``config.esu``: by default MUSE's (SA-TA + SimTier over the multimodal similarities
of what they retrieved), as the paper sets them up; ``esu="ta"`` is the classic ID-only SIM."""

from __future__ import annotations

import torch

from ranker.layers.rows import chunked
from ranker.models.base import CTRModel, Retrieved, retrieved_from_history
from retriever.kernels import TopK, gsu_topk, l2_normalise

#: ``l2_normalise``'s floor on the norm
NORM_EPS = 1e-12


class SIMHard(CTRModel):
    """The K most recent behaviours of the target's category (from the pipeline), then the ESU."""

    name = "sim-hard"
    retrieval = "category"


class SIMSoft(CTRModel):
    """The top K behaviours by cosine of learned (item, category) embeddings, then the ESU."""

    name = "sim-soft"
    retrieval = "history"

    def retrieve(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> Retrieved:
        ids, mask = batch["history"], batch["history_mask"]  # [B, L, 2], [B, L]
        k, target = min(self.config.k, ids.shape[1]), l2_normalise(target.detach())

        def search(rows: slice) -> TopK:  # rows of the batch are independent: chunks stay in cache
            hist = self.embeddings.seq(ids[rows])  # [b, L, 2D]
            norm = torch.linalg.vector_norm(hist, dim=-1, keepdim=True)  # [b, L, 1]
            valid = mask[rows] & (norm[..., 0] > 0)  # an all-zero row (padding) has no direction
            hist.div_(norm.clamp_min_(NORM_EPS))  # what l2_normalise does, in place
            return gsu_topk(target[rows], hist, k, valid=valid, normalised=True)  # [b, K]

        with torch.no_grad():  # the search is not differentiable; only the ESU learns from it
            top = chunked(ids.shape[0], ids.shape[1] * self.embeddings.seq_dim * 4, search, device=ids.device)
        return retrieved_from_history(batch, top.indices, top.valid)
