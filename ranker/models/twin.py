"""TWIN: the GSU scores the whole history with the ESU's own attention projections (scaled
dot product), keeps the top K, and the ESU attends over them with the same projections; by default
SimTier over the retrieved and the recent behaviours' multimodal similarities is added (the paper's
set-up), ``esu="ta"`` is the classic TWIN."""

from __future__ import annotations

import torch

from ranker.layers.attention import MASK_LOGIT
from ranker.layers.rows import chunked
from ranker.models.base import CTRModel, Retrieved, retrieved_from_history


class TWIN(CTRModel):
    name = "twin"
    retrieval = "history"

    def retrieve(self, batch: dict[str, torch.Tensor], target: torch.Tensor) -> Retrieved:
        ids, mask = batch["history"], batch["history_mask"]  # [B, L, 2], [B, L]
        k = min(self.config.k, ids.shape[1])
        attention = self.long_attention

        def search(rows: slice) -> tuple[torch.Tensor]:  # rows are independent: chunks stay in cache
            logits = attention.logits(target[rows], self.embeddings.seq(ids[rows]))  # [b, L]
            return (logits.masked_fill_(~mask[rows], MASK_LOGIT).topk(k, dim=1).indices,)  # [b, K]

        with torch.no_grad():  # consistent scoring: the ESU's logits, but no gradient through the search
            (indices,) = chunked(ids.shape[0], ids.shape[1] * attention.out_dim * 4, search,
                                  device=ids.device)  # [B, K]
        return retrieved_from_history(batch, indices, torch.gather(mask, 1, indices))
