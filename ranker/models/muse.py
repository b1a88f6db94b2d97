"""MUSE: multimodal GSU (done by the data pipeline or the retriever with the same kernels), then an
ESU of SA-TA and/or SimTier over the top K, plus SimTier over the recent behaviours (the shared ESU
of :class:`ranker.models.base.CTRModel`)."""

from __future__ import annotations

from ranker.models.base import CTRModel
from ranker.models.config import MUSEConfig


class MUSE(CTRModel):
    name = "muse"
    retrieval = "multimodal"
    config: MUSEConfig
