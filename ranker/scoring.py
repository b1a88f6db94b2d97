"""Online scoring: ``Ranker.load(settings, run_id).score(user_id, candidate_item_ids)`` -> click
probabilities of the candidates, batched, with the same numbers as offline evaluation on the same
input (the user's whole history, up to the model's ``max_history``).

For MUSE the long-sequence search runs on the retriever's serving path
(:class:`retriever.client.Retriever`, device cache by default): the top K of each candidate over the
user's behaviour vectors in Milvus, and the recent behaviours' similarities from the item vectors
with the same kernel (:func:`retriever.kernels.gsu_topk`). Other models need only the histories.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from muse.errors import ConfigurationError
from muse.settings import Settings
from ranker.data import BatchBuilder, HistoryStore, VectorsFor, VectorTable, run_vectors
from ranker.runs import LoadedRun, load_run
from retriever.kernels import MISSING_SCORE, gsu_topk

log = logging.getLogger(__name__)

#: Candidates scored per forward pass.
SCORE_BATCH = 256


class Ranker:
    """A trained run ready to score candidates for a user.

    Args:
        loaded: the checkpoint (model in eval mode and its feature space).
        histories: every user's history (ids), from the run's dataset.
        retriever: the GSU client for the run's source (multimodal models only).
    """

    def __init__(self, loaded: LoadedRun, histories: HistoryStore, retriever: Any = None,
                 vectors: VectorTable | None = None) -> None:
        self.model = loaded.model.eval()
        self.space = loaded.space
        self.source = loaded.source
        self.histories = histories
        self.retriever = retriever
        cfg = self.model.config
        multimodal = self.model.retrieval == "multimodal"
        if multimodal and retriever is None:
            raise ConfigurationError(f"model {self.model.name!r} needs a retriever for source {self.source!r}")
        # the multimodal search comes from the retriever, so the builder makes only the rest
        # (a baseline whose ESU uses multimodal similarities gets them from ``vectors``, the source's table)
        self.builder = BatchBuilder(self.space, histories, "none" if multimodal else self.model.retrieval,
                                    cfg.k, cfg.recent_len, cfg.max_history, None if multimodal else vectors)

    @classmethod
    def load(
        cls, settings: Settings, run_id: int, retriever: Any = None, backend: str = "cache", version: int | None = None,
        vectors_for: VectorsFor | None = None,
    ) -> Ranker:
        """Load run ``run_id``. For MUSE a :class:`~retriever.client.Retriever` on the run's dataset and
        source is opened (``backend`` ``cache`` or ``milvus``) unless one is given: on source ``version``,
        or following the live version when None. A baseline whose ESU reads item vectors gets them
        from ``vectors_for(source, dataset)``, injected by the caller (the CLI passes the embedding
        stage's ``item_vectors``).

        Raises:
            NotFoundError: the run, its checkpoint or its dataset does not exist.
        """
        from muse.data.format import Dataset

        loaded = load_run(settings, run_id)
        histories = HistoryStore.from_dataset(Dataset.open(settings, loaded.dataset), loaded.space)
        if loaded.model.retrieval == "multimodal" and retriever is None:
            from retriever.client import Retriever

            retriever = Retriever.from_settings(
                source=loaded.source, settings=settings, dataset=loaded.dataset, version=version, backend=backend
            )
            log.info("ranker run %d scores with %s", run_id, retriever.ref)
        item_vectors = run_vectors(loaded.model, loaded.source, loaded.dataset, vectors_for,
                                   multimodal_from_retriever=True)
        vectors = None if item_vectors is None else VectorTable(loaded.space, item_vectors)
        return cls(loaded, histories, retriever, vectors)

    @torch.no_grad()
    def score(self, user_id: int, candidate_item_ids: Sequence[int] | np.ndarray,
              batch_size: int = SCORE_BATCH) -> np.ndarray:
        """Click probabilities ``float64 [n]`` of ``candidate_item_ids`` for ``user_id``.

        Raises:
            NotFoundError: the user has no history in the run's dataset.
            ConfigurationError: no candidates.
        """
        items = np.asarray(candidate_item_ids, dtype=np.int64).reshape(-1)
        if len(items) == 0:
            raise ConfigurationError("candidate_item_ids is empty: give at least one item")
        out = []
        # one version of the source's vectors for every candidate (a promote may happen meanwhile)
        view = self.retriever.view() if self.model.retrieval == "multimodal" else None
        for lo in range(0, len(items), batch_size):
            chunk = items[lo:lo + batch_size]
            users = np.full(len(chunk), int(user_id), dtype=np.int64)
            batch = self.builder.build(users, chunk)
            if view is not None:
                batch.update(self._multimodal(view, int(user_id), chunk, batch))
            out.append(self.model(batch)["prob"].numpy().astype(np.float64))
        return np.concatenate(out)

    def _multimodal(
        self, view: Any, user_id: int, items: np.ndarray, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``long``/``long_mask``/``long_sim`` from the retriever and ``recent_sim`` from item vectors."""
        k, n = self.model.config.k, len(items)
        start, length = (int(v[0]) for v in self.histories.rows(np.array([user_id])))
        oldest = length - min(length, self.model.config.max_history)  # same window as offline
        long = torch.zeros(n, k, 2, dtype=torch.int64)
        long_mask = torch.zeros(n, k, dtype=torch.bool)
        long_sim = torch.full((n, k), MISSING_SCORE, dtype=torch.float32)
        # the retriever's unit target vectors; zero rows = no vector (such a target searches nothing)
        target_vec = torch.from_numpy(view.target_vectors(items.tolist(), missing="zero")).float()  # [B, d]
        has = np.flatnonzero(target_vec.any(dim=-1).numpy()).tolist()
        if has:
            res = view.search_vectors(user_id, target_vec[has].numpy(), k=k + oldest if oldest else k)
            # the user's window, read once for every target (positional reads: nothing is mapped)
            window_items, window_categories, _ = self.histories.window(np.array([start]), np.array([length]),
                                                                       length - oldest)
            for b, hits in zip(has, res, strict=True):
                keep = hits.positions >= oldest
                pos, scores = hits.positions[keep][:k], hits.scores[keep][:k]
                m = len(pos)
                items, categories = window_items[0, pos - oldest], window_categories[0, pos - oldest]
                long[b, :m, 0] = torch.from_numpy(items)
                long[b, :m, 1] = torch.from_numpy(categories)
                long_mask[b, :m] = True
                long_sim[b, :m] = torch.from_numpy(scores.astype(np.float32))
        return {"long": long, "long_mask": long_mask, "long_sim": long_sim,
                **self._recent_sim(view, target_vec, batch)}

    def _recent_sim(
        self, view: Any, target_vec: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Cosines of the recent behaviours (one row, shared by all candidates) with each target."""
        rec_idx = batch["recent"][0, :, 0]  # [R] item indices (the same user on every row)
        rmask = batch["recent_mask"][0]  # [R]
        raw_ids = self.space.items.values[np.maximum(rec_idx.numpy() - 1, 0)]
        rec_vec = torch.zeros(len(raw_ids), view.dim)  # [R, d]; zero = padding or no vector
        valid = np.flatnonzero(rmask.numpy())
        if len(valid):
            rec_vec[valid] = torch.from_numpy(view.target_vectors(raw_ids[valid].tolist(), missing="zero")).float()
        n, r = target_vec.shape[0], len(raw_ids)
        present = (rmask & rec_vec.any(dim=-1)).expand(n, r) & target_vec.any(dim=-1, keepdim=True)  # [B, R]
        top = gsu_topk(target_vec, rec_vec.expand(n, r, -1), r, valid=present, normalised=True)
        sim = torch.empty_like(top.scores).scatter_(1, top.indices, top.scores)  # [B, R] in sequence order
        return {"recent_sim": sim, "recent_sim_mask": present.clone()}

    def close(self) -> None:
        """Close the retriever (if this ranker opened one)."""
        if self.retriever is not None:
            self.retriever.close()

    def __enter__(self) -> Ranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
