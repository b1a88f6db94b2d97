"""The ranker's data pipeline: impressions joined with histories, item and user features, and the
long-sequence search each model needs, turned into batches of tensors (see :mod:`ranker.models.base`).

Everything categorical is mapped to dense indices (0 = padding / unknown) by a :class:`FeatureSpace`
built once from the dataset and saved with each checkpoint, so scoring maps ids exactly as training
did. The multimodal GSU runs in the batch with the retriever's kernels
(:func:`retriever.kernels.gsu_topk`), on an item-vector table loaded once from an embedding source,
so training, evaluation and serving compute the same top K.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from muse.ahead import ahead
from muse.arrays import lookup_sorted
from muse.errors import ConfigurationError, DataError, NotFoundError
from muse.ondisk import PageBudget, read_runs
from ranker.layers.rows import chunked, row_chunks
from retriever.kernels import TopK, gsu_topk, l2_normalise

log = logging.getLogger(__name__)

#: Item feature columns of ``items.parquet`` besides ``item_id`` (order of ``batch["target"]`` after the id).
ITEM_FEATURES = ("category", "feat_a", "feat_b")
#: How many impressions the shuffle buffer holds.
SHUFFLE_BUFFER = 65_536


class ItemVectorsLike(Protocol):
    """One vector per item of the dataset, under one embedding-source version: what the embedding
    stage's ``item_vectors`` returns, handed in by the caller (the CLI); the ranker never loads or
    computes vectors itself. Optional attributes: ``scale`` (int8 storage: vector = row / scale) and
    ``normalised`` (rows are unit vectors already)."""

    item_ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # [n, d] float32 (or int8 with ``scale``), possibly memory-mapped
    present: np.ndarray  # bool [n]; False = the item has no vector (ranks last in the GSU)


#: ``vectors_for(source, dataset_name)``: the item vectors of an embedding source on a dataset, injected
#: by the caller where the source is known only inside the call (a run's checkpoint, a comparison
#: over several sources).
VectorsFor = Callable[[str, str], ItemVectorsLike]


class Vocab:
    """Raw int64 values -> dense indices ``1..n`` (0 = padding / unknown value)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.unique(np.asarray(values, dtype=np.int64))  # sorted

    @classmethod
    def from_sorted(cls, values: np.ndarray) -> Vocab:
        """A vocabulary over ``values``, already sorted and distinct (:attr:`values` of another)."""
        vocab = cls.__new__(cls)
        vocab.values = np.asarray(values, dtype=np.int64)
        return vocab

    @property
    def size(self) -> int:
        """Rows an embedding table needs (values + padding)."""
        return len(self.values) + 1

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        """Indices of ``raw`` (any shape); unknown values map to 0."""
        pos, hit = lookup_sorted(self.values, raw)
        return np.where(hit, pos + 1, 0).astype(np.int64)


#: Version of :meth:`FeatureSpace.state` (checkpoints before it hold the raw columns instead).
SPACE_STATE_FORMAT = 2


class FeatureSpace:
    """Vocabularies of every field, item features by item index and user features by user index.

    Held in RAM by design, sized by the vocabularies: the sorted item ids (8 bytes an item), the item
    features' indices (int32, 12 bytes an item), the sorted user ids (8 bytes a user), the user
    features' indices (4 bytes a user and field) and each feature's distinct values. A checkpoint
    saves exactly these arrays (:meth:`state`), as tensors written from their own memory.
    """

    def __init__(self, user_fields: tuple[str, ...], items: Vocab, users: Vocab, vocabs: dict[str, Vocab],
                 item_features: np.ndarray, user_features: np.ndarray) -> None:
        self.user_fields = tuple(user_fields)
        self.items = items
        self.users = users
        self.vocabs = vocabs
        self.item_features = item_features  # int32 [n_items + 1, 3]: item index -> feature indices (row 0: padding)
        self.user_features = user_features  # int32 [n_users + 1, n user fields]
        missing = [f for f in (*ITEM_FEATURES, *self.user_fields) if f not in vocabs]
        if missing or item_features.shape != (items.size, len(ITEM_FEATURES)) or \
                user_features.shape != (users.size, len(self.user_fields)):
            raise DataError(f"feature space is inconsistent (fields missing: {missing}, item features "
                            f"{tuple(item_features.shape)}, user features {tuple(user_features.shape)})")

    @classmethod
    def from_columns(cls, items: dict[str, np.ndarray], users: dict[str, np.ndarray],
                     user_fields: tuple[str, ...]) -> FeatureSpace:
        """Build from raw columns: ``item_id`` and :data:`ITEM_FEATURES`; ``user_id`` and ``user_fields``."""
        item_vocab = Vocab(items["item_id"])
        vocabs: dict[str, Vocab] = {f: Vocab(items[f]) for f in ITEM_FEATURES}
        vocabs.update({f: Vocab(users[f]) for f in user_fields})
        order = np.searchsorted(item_vocab.values, np.asarray(items["item_id"], dtype=np.int64))
        # int32 indices (vocabularies stay far below 2**31): 12 bytes an item, 4 a user field
        item_features = np.zeros((item_vocab.size, len(ITEM_FEATURES)), dtype=np.int32)
        for j, f in enumerate(ITEM_FEATURES):
            item_features[order + 1, j] = vocabs[f].lookup(items[f])
        user_vocab = Vocab(users["user_id"])
        uorder = np.searchsorted(user_vocab.values, np.asarray(users["user_id"], dtype=np.int64))
        user_features = np.zeros((user_vocab.size, len(user_fields)), dtype=np.int32)
        for j, f in enumerate(user_fields):
            user_features[uorder + 1, j] = vocabs[f].lookup(users[f])
        return cls(user_fields, item_vocab, user_vocab, vocabs, item_features, user_features)

    @classmethod
    def from_dataset(cls, dataset: Any) -> FeatureSpace:
        """Build from ``items.parquet`` and ``users.parquet`` of a :class:`muse.data.format.Dataset`."""
        import pyarrow as pa

        items, users = _raw_columns(dataset, dataset.meta.get("user_feature_names"))
        space = cls.from_columns(items, users, tuple(c for c in users if c != "user_id"))
        del items, users
        pa.default_memory_pool().release_unused()  # the tables' buffers go back to the system
        return space

    def vocab_sizes(self) -> dict[str, int]:
        """Embedding table sizes: ``item`` and every feature field."""
        return {"item": self.items.size, **{f: v.size for f, v in self.vocabs.items()}}

    def state(self) -> dict[str, Any]:
        """The built space, to rebuild it exactly (saved in checkpoints): tensors over the arrays this
        space holds (no copy; ``torch.save`` writes them from their memory)."""
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a))

        return {"format": SPACE_STATE_FORMAT, "user_fields": list(self.user_fields),
                "item_ids": t(self.items.values), "user_ids": t(self.users.values),
                "vocabs": {f: t(v.values) for f, v in self.vocabs.items()},
                "item_features": t(self.item_features), "user_features": t(self.user_features)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureSpace:
        """The space :meth:`state` saved (or, from an older checkpoint, the raw columns it saved).

        Raises:
            DataError: the saved arrays do not fit together.
        """
        user_fields = tuple(state["user_fields"])
        if state.get("format") != SPACE_STATE_FORMAT:
            return cls.from_columns(state["items"], state["users"], user_fields)

        def a(x: Any) -> np.ndarray:
            return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

        return cls(user_fields, Vocab.from_sorted(a(state["item_ids"])), Vocab.from_sorted(a(state["user_ids"])),
                   {f: Vocab.from_sorted(a(v)) for f, v in state["vocabs"].items()},
                   a(state["item_features"]).astype(np.int32, copy=False),
                   a(state["user_features"]).astype(np.int32, copy=False))


def _raw_columns(dataset: Any, user_fields: Any = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The item columns (not the titles: never used here) and the user columns (``user_id`` and
    ``user_fields``; every column when None) a :class:`FeatureSpace` is built from, in that order."""
    items_t = dataset.items(columns=["item_id", *ITEM_FEATURES])
    users_t = dataset.users()
    fields = list(user_fields) if user_fields else [c for c in users_t.column_names if c != "user_id"]
    return ({c: items_t.column(c).to_numpy() for c in ("item_id", *ITEM_FEATURES)},
            {c: users_t.column(c).to_numpy() for c in ("user_id", *fields)})


class HistoryStore:
    """Every user's history, memory-mapped from the dataset's CSR (``histories/``): per user a run of
    item positions and category positions, mapped to the model's vocabulary indices on read.

    Held in RAM by design (sized by the vocabularies): the sorted user ids with their rows (16 bytes per
    user), item position -> item index (4 bytes per item) and category position -> category index.
    The entries (8 bytes per behaviour) stay on disk; pages read are dropped from this process's
    memory: the batches' windows (:meth:`window`) are read with positional reads, which map nothing;
    reads by position (:meth:`entries`, the reference path) drop the mapped pages every
    ``release_bytes`` (:meth:`touch`). A pass over every history does not grow the process (the page
    cache keeps what it can).
    """

    def __init__(self, csr: Any, item_map: np.ndarray, category_map: np.ndarray,
                 release_bytes: int = 64 << 20) -> None:
        self.csr = csr
        row_ids = np.asarray(csr.row_ids, dtype=np.int64)
        order = np.argsort(row_ids, kind="stable")
        self.user_ids = row_ids[order]  # sorted
        offsets = np.asarray(csr.offsets, dtype=np.int64)
        self.starts = offsets[:-1][order]
        self.lengths = np.diff(offsets)[order]
        self.item_positions = csr.entries("items")  # int32 [n_behaviours], memory-mapped
        self.category_positions = csr.entries("categories")  # int32 [n_behaviours], memory-mapped
        self.item_map = item_map  # int32 [n item positions]: item position -> item index (0 unknown)
        self.category_map = category_map  # int64 [n category positions] -> category index
        self._pages = PageBudget(self.item_positions, self.category_positions, budget=release_bytes)
        # What padded window slots hold: the first entry's indices, as indexing position 0 always gave
        # (the mask hides them). Read once, by position: touching the mapping would map pages.
        self._pad = (0, 0)
        if len(self.item_positions):
            zero, one = np.zeros(1, np.int64), np.ones(1, np.int64)
            self._pad = (int(item_map[read_runs(self.item_positions, zero, one, 1)[0, 0]]),
                         int(category_map[read_runs(self.category_positions, zero, one, 1)[0, 0]]))

    @classmethod
    def from_dataset(cls, dataset: Any, space: FeatureSpace, mmap: bool = True) -> HistoryStore:
        """The dataset's histories mapped through ``space`` (``mmap=False`` reads the entries into RAM)."""
        from muse.ondisk import CSR

        csr = CSR(dataset.path / "histories", mmap=mmap)
        if len(csr) == 0:
            raise DataError(f"dataset {dataset.name!r} has no histories")
        item_map = space.items.lookup(dataset.history_item_ids()).astype(np.int32)
        category_map = space.vocabs["category"].lookup(dataset.category_ids())
        return cls(csr, item_map, category_map)

    def rows(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(start, length)`` of each user's history in the flat arrays; NotFoundError on unknown users."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        pos, found = lookup_sorted(self.user_ids, user_ids)
        bad = ~found
        if bad.any():
            raise NotFoundError(f"user {int(user_ids[bad][0])} has no history in the dataset")
        return self.starts[pos], self.lengths[pos]

    def entries(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, category indices) at flat entry positions ``pos`` (any shape)."""
        items = self.item_map[self.item_positions[pos]]
        categories = self.category_map[self.category_positions[pos]]
        self.touch(pos.size * 8)
        return items.astype(np.int64, copy=False), categories

    def window(self, starts: np.ndarray, lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The newest ``min(length, width)`` entries of each history ``(start, length)``, left-aligned:
        item indices int64 ``[B, width]``, category indices ``[B, width]`` and validity ``[B, width]``.
        Read from the files with positional reads (:func:`muse.ondisk.read_runs`): nothing is mapped."""
        n = np.minimum(np.asarray(lengths, dtype=np.int64), width)  # [B]
        first = np.asarray(starts, dtype=np.int64) + np.asarray(lengths, dtype=np.int64) - n  # [B]
        valid = np.arange(width)[None, :] < n[:, None]  # [B, W]
        item_pos = read_runs(self.item_positions, first, n, width)  # [B, W] (0 where padded)
        category_pos = read_runs(self.category_positions, first, n, width)
        items = np.where(valid, self.item_map[item_pos], self._pad[0])
        categories = np.where(valid, self.category_map[category_pos], self._pad[1])
        return items.astype(np.int64, copy=False), categories, valid

    def touch(self, n_bytes: int) -> None:
        """Count ``n_bytes`` read; past ``release_bytes`` the mapped pages are released."""
        self._pages.read(n_bytes)


class VectorTable:
    """The item vectors of an embedding source, in their storage dtype (float32, or int8 with a scale
    as Taobao-MM ships them), memory-mapped when the caller hands a mapped table; indexed by the item
    indices of a :class:`FeatureSpace` (index 0 = padding). Rows are L2-normalised when read unless
    the source says they are already (``normalised``).

    Held in RAM by design: item index -> table row (8 bytes per item) and the presence flags.
    """

    def __init__(self, space: FeatureSpace, source: ItemVectorsLike) -> None:
        vectors = source.vectors
        if vectors.ndim != 2 or len(vectors) != len(source.item_ids) or len(source.present) != len(source.item_ids):
            raise DataError(
                f"item vector table is inconsistent: {len(source.item_ids)} ids, vectors {vectors.shape}, "
                f"{len(source.present)} present flags"
            )
        self.dim = int(vectors.shape[1])
        self.scale = getattr(source, "scale", None)
        self.normalised = bool(getattr(source, "normalised", False)) and self.scale is None
        self._array = vectors  # kept: its mapped pages are released as the table is read
        self._pages = PageBudget(vectors, budget=128 << 20)
        self.raw = _as_tensor(vectors)  # [n, d] storage dtype
        idx = space.items.lookup(source.item_ids)
        keep = idx > 0
        present = np.asarray(source.present, dtype=bool) & _nonzero_rows(vectors)  # zero rows: missing
        self.rows = torch.zeros(space.items.size, dtype=torch.int64)  # item index -> table row
        self.rows[torch.from_numpy(idx[keep])] = torch.from_numpy(np.flatnonzero(keep))
        self.present = torch.zeros(space.items.size, dtype=torch.bool)  # [n_items + 1]
        self.present[torch.from_numpy(idx[keep])] = torch.from_numpy(present[keep])
        self._scratch = threading.local()
        log.info("vector table: %d of %d items have a %d-d %s vector", int(self.present.sum()), len(idx), self.dim,
                 vectors.dtype)

    def gather(self, idx: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Unit vectors ``[..., d]`` (float32) of item indices ``idx [...]``; rows without a vector are
        whatever the table holds there (the caller masks them with :attr:`present`).

        With ``scratch`` a float32 table's result lands in a buffer reused by the next ``scratch`` call
        of the same thread (valid until then): a fresh 50 MB tensor per batch costs more in page faults
        than the gather itself.
        """
        flat = self.rows.index_select(0, idx.reshape(-1))
        self._pages.read(flat.numel() * self.raw.shape[1] * self.raw.element_size())
        if self.normalised and self.raw.dtype == torch.float32:
            if not scratch:
                return self.raw.index_select(0, flat).view(*idx.shape, self.dim)
            buf = getattr(self._scratch, "buf", None)
            if buf is None or buf.numel() < flat.numel() * self.dim:
                buf = self._scratch.buf = torch.empty(flat.numel() * self.dim)
            out = buf[: flat.numel() * self.dim].view(flat.numel(), self.dim)
            torch.index_select(self.raw, 0, flat, out=out)
            return out.view(*idx.shape, self.dim)
        rows = self.raw.index_select(0, flat).float()
        if self.scale is not None:
            rows /= float(self.scale)
        return l2_normalise(rows).view(*idx.shape, self.dim)

    @property
    def vectors(self) -> _UnitRows:
        """``table.vectors[idx]``: the unit vectors of item indices ``idx`` (int, slice, array or tensor),
        read on demand (never the whole table)."""
        return _UnitRows(self)


class _UnitRows:
    """Indexing proxy of :attr:`VectorTable.vectors`."""

    def __init__(self, table: VectorTable) -> None:
        self.table = table

    def __getitem__(self, idx: Any) -> torch.Tensor:
        size = len(self.table.present)
        if isinstance(idx, slice):
            idx = torch.arange(size)[idx]
        scalar = isinstance(idx, (int, np.integer))
        idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.int64)
        out = self.table.gather(idx.reshape(-1)).clone()
        return out[0] if scalar else out.view(*idx.shape, self.table.dim)


def _as_tensor(vectors: np.ndarray) -> torch.Tensor:
    """A tensor over ``vectors`` without copying a memory-mapped table into RAM."""
    import warnings

    arr = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    with warnings.catch_warnings():  # a read-only mapping: the table is never written through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr) if arr.dtype in (np.float32, np.float16, np.int8) else torch.from_numpy(
            arr.astype(np.float32))


def _nonzero_rows(vectors: np.ndarray, rows: int = 1 << 16) -> np.ndarray:
    """Whether each row has a non-zero value, read a block of rows at a time; a mapped table's pages
    are dropped from this process as the pass goes (it reads every page of the table once)."""
    out = np.zeros(len(vectors), dtype=bool)
    pages = PageBudget(vectors, budget=64 << 20)
    for lo in range(0, len(vectors), rows):
        block = np.asarray(vectors[lo:lo + rows])
        out[lo:lo + rows] = np.any(block != 0, axis=1)
        pages.read(block.nbytes)
    pages.release()
    return out


class BatchBuilder:
    """Turns ``(user_ids, item_ids, hist_lens)`` into a model batch (see :mod:`ranker.models.base`).

    Args:
        space: the feature vocabularies.
        histories: every user's history.
        retrieval: the model's ``retrieval`` (``none``, ``category``, ``multimodal``, ``history``).
        k: GSU top K; recent_len: short-sequence length; max_history: newest entries kept.
        vectors: the item-vector table (needed by ``multimodal``).
    """

    def __init__(self, space: FeatureSpace, histories: HistoryStore, retrieval: str, k: int, recent_len: int,
                 max_history: int, vectors: VectorTable | None = None) -> None:
        if retrieval == "multimodal" and vectors is None:
            raise DataError("the multimodal GSU needs an item-vector table (give an embedding source)")
        self.space, self.histories, self.retrieval = space, histories, retrieval
        self.k, self.recent_len, self.max_history = k, recent_len, max_history
        self.vectors = vectors

    def build(self, user_ids: np.ndarray, item_ids: np.ndarray, hist_lens: np.ndarray | None = None,
              labels: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """One batch; ``hist_lens`` (default: whole history) is how many leading entries each impression sees."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        starts, lengths = self.histories.rows(user_ids)
        if hist_lens is not None:
            lengths = np.minimum(lengths, np.asarray(hist_lens, dtype=np.int64))
        item_idx = self.space.items.lookup(item_ids)  # [B]
        target = np.concatenate([item_idx[:, None], self.space.item_features[item_idx]], axis=1)  # [B, 4] int64
        user = self.space.user_features[self.space.users.lookup(user_ids)].astype(np.int64)  # [B, n_user]
        batch: dict[str, torch.Tensor] = {
            "user_id": torch.from_numpy(user_ids),
            "user": torch.from_numpy(user),
            "target": torch.from_numpy(target),
        }
        batch["recent"], valid = self._window_ids(starts, lengths, self.recent_len)  # [B, R, 2]
        batch["recent_mask"] = torch.from_numpy(valid)  # [B, R]
        if self.retrieval != "none":
            width = max(self.k, int(min(lengths.max(initial=0), self.max_history)))
            history, hvalid = self._window_ids(starts, lengths, width)
            history_mask = torch.from_numpy(hvalid)  # [B, L, 2], [B, L]
            if self.retrieval == "history":
                batch["history"], batch["history_mask"] = history, history_mask
                if self.vectors is not None:
                    batch["history_sim"], batch["history_sim_mask"] = self._cosines(batch["target"], history,
                                                                                    history_mask)
            elif self.retrieval == "category":
                batch["long"], batch["long_mask"] = self._same_category(history, history_mask, batch["target"])
                if self.vectors is not None:
                    batch["long_sim"], batch["long_sim_mask"] = self._cosines(batch["target"], batch["long"],
                                                                              batch["long_mask"])
            else:
                batch.update(self._multimodal(history, history_mask, batch))
        if self.vectors is not None and self.retrieval != "multimodal":
            target_vec = self.vectors.gather(batch["target"][:, 0])  # [B, d]
            batch.update(self._recent_sim(target_vec, batch))
        if labels is not None:
            batch["label"] = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        return batch

    def _window_ids(self, starts: np.ndarray, lengths: np.ndarray, width: int) -> tuple[torch.Tensor, np.ndarray]:
        """(item, category) indices ``[B, width, 2]`` of the newest ``min(length, width)`` entries of
        each row (oldest first, left-aligned) and their validity ``[B, width]``."""
        items, categories, valid = self.histories.window(starts, lengths, width)
        return torch.from_numpy(np.stack([items, categories], axis=-1)), valid

    def _same_category(self, history: torch.Tensor, mask: torch.Tensor,
                       target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SIM hard search: the K most recent behaviours whose category equals the target's."""
        same = mask & (history[..., 1] == target[:, 1:2])  # [B, L]
        position = torch.arange(history.shape[1]).expand_as(same)  # [B, L]
        key = torch.where(same, position, torch.full_like(position, -1))  # newest = largest
        top, idx = key.topk(self.k, dim=1)  # [B, K]
        return torch.gather(history, 1, idx.unsqueeze(-1).expand(-1, -1, 2)), top >= 0

    def _cosines(self, target: torch.Tensor, seq: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimodal cosine ``[B, L]`` of each behaviour of ``seq [B, L, 2]`` with the target, and where
        it is defined (behaviour valid, both with a vector); 0 elsewhere."""
        table = self.vectors
        target_vec = table.gather(target[:, 0])  # [B, d]
        idx = seq[..., 0]  # [B, L]
        ok = mask & table.present[idx] & table.present[target[:, 0]].unsqueeze(1)  # [B, L]
        sim = torch.empty(idx.shape, device=target_vec.device)  # [B, L]
        for rows in row_chunks(idx.shape[0], idx.shape[1] * table.dim * 4, device=idx.device):  # in cache
            sim[rows] = torch.einsum("bd,bld->bl", target_vec[rows], table.gather(idx[rows], scratch=True))
        return sim.masked_fill_(~ok, 0.0), ok

    def _multimodal(self, history: torch.Tensor, mask: torch.Tensor,
                    batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MUSE's GSU: cosine top K of the target's vector over the history's vectors."""
        table = self.vectors
        target_vec = table.gather(batch["target"][:, 0])  # [B, d]
        target_ok = table.present[batch["target"][:, 0]].unsqueeze(1)  # [B, 1]: no vector -> no search
        hist_idx = history[..., 0]  # [B, L]
        valid = mask & table.present[hist_idx] & target_ok  # [B, L]

        def search(rows: slice) -> TopK:  # [b, L, d] vectors, only read by the kernel, stay in cache
            return gsu_topk(target_vec[rows], table.gather(hist_idx[rows], scratch=True), self.k,
                            valid=valid[rows], normalised=True)

        top = chunked(hist_idx.shape[0], hist_idx.shape[1] * table.dim * 4, search, device=hist_idx.device)
        long = torch.gather(history, 1, top.indices.unsqueeze(-1).expand(-1, -1, 2))  # [B, K, 2]
        return {"long": long, "long_mask": top.valid, "long_sim": top.scores,
                **self._recent_sim(target_vec, batch)}

    def _recent_sim(self, target_vec: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Multimodal cosine of every recent behaviour, in the recent sequence's order (same kernel)."""
        table = self.vectors
        rec_idx = batch["recent"][..., 0]  # [B, R]
        target_ok = table.present[batch["target"][:, 0]].unsqueeze(1)  # [B, 1]
        rmask = batch["recent_mask"] & table.present[rec_idx] & target_ok  # [B, R]
        top = gsu_topk(target_vec, table.gather(rec_idx), rec_idx.shape[1], valid=rmask, normalised=True)  # sorted
        sim = torch.empty_like(top.scores).scatter_(1, top.indices, top.scores)  # back to sequence order
        return {"recent_sim": sim, "recent_sim_mask": rmask}


def impression_blocks(n: int, world: int = 1, rank: int = 0, block: int = SHUFFLE_BUFFER) -> list[tuple[int, int]]:
    """The row ranges ``[lo, hi)`` of a split's ``n`` impressions that rank ``rank`` of ``world`` reads:
    blocks of ``block`` rows dealt round-robin, so every impression belongs to exactly one rank."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigurationError(f"rank {rank} of world size {world} is not valid")
    return [(lo, min(lo + block, n)) for i, lo in enumerate(range(0, n, block)) if i % world == rank]


def iter_impression_batches(dataset: Any, split: str | None, batch_size: int, shuffle: bool = False,
                            seed: int = 0, limit: int | None = None, world: int = 1,
                            rank: int = 0, block: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Stream impressions of ``split`` (or of both, train first) in batches of ``batch_size`` (the last
    may be smaller), read from the memory-mapped columns a block of ``SHUFFLE_BUFFER`` rows at a time.

    With ``shuffle`` the blocks are visited in a seeded random order and the rows shuffled within each.
    ``limit`` keeps the first ``limit`` impressions of the split (before sharding). ``world``/``rank``:
    this process reads only its blocks (:func:`impression_blocks`, ``block`` rows each, default
    ``SHUFFLE_BUFFER``); the ranks together read each impression once. Without shuffle, one process's
    batches do not depend on ``block``.
    """
    rng = np.random.default_rng(seed)
    columns = ("user_id", "item_id", "label", "hist_len")
    splits = (split,) if split is not None else ("train", "test")
    for sp in splits:
        cols = dataset.impressions(sp)
        n = len(cols) if limit is None else min(len(cols), max(0, limit))
        blocks = impression_blocks(n, world, rank, block or SHUFFLE_BUFFER)
        if shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        carry: dict[str, np.ndarray] | None = None
        for lo, hi in blocks:
            part = cols.slice(lo, hi, columns)
            if shuffle:
                perm = rng.permutation(hi - lo)
                part = {c: a[perm] for c, a in part.items()}
            if carry is not None:
                part = {c: np.concatenate([carry[c], part[c]]) for c in columns}
            m = len(part["label"])
            full = (m // batch_size) * batch_size
            for start in range(0, full, batch_size):
                yield {c: a[start:start + batch_size] for c, a in part.items()}
            carry = {c: a[full:] for c, a in part.items()} if full < m else None
        if carry is not None:
            yield carry


def open_builder(dataset: Any, retrieval: str, config: Any, vectors: ItemVectorsLike | None,
                 space: FeatureSpace | None = None, with_vectors: bool | None = None,
                 mmap: bool = True) -> BatchBuilder:
    """The batch builder of one model on one dataset: feature space (built, or the checkpoint's),
    histories, and the item-vector table made from ``vectors`` when the model needs it
    (``with_vectors``; default: the config's ``needs_vectors``, else the multimodal GSU). The
    histories are memory-mapped (``mmap=False`` reads them into RAM: the reference path of the tests).

    Raises:
        DataError: the model needs item vectors and ``vectors`` is None.
    """
    space = space or FeatureSpace.from_dataset(dataset)
    histories = HistoryStore.from_dataset(dataset, space, mmap=mmap)
    table = None
    if with_vectors is None:
        with_vectors = bool(getattr(config, "needs_vectors", retrieval == "multimodal"))
    if with_vectors or retrieval == "multimodal":
        if vectors is None:
            raise DataError("this model's GSU or ESU needs the item vectors of an embedding source (e.g. --source scl)")
        table = VectorTable(space, vectors)
    return BatchBuilder(space, histories, retrieval, config.k, config.recent_len, config.max_history, table)


def run_vectors(model: Any, source: str | None, dataset: str, vectors_for: VectorsFor | None,
                multimodal_from_retriever: bool = False) -> ItemVectorsLike | None:
    """The item vectors a loaded run's model reads (None when it reads none), from ``vectors_for``.

    With ``multimodal_from_retriever`` a multimodal GSU takes its vectors from the retriever instead.

    Raises:
        ConfigurationError: the model reads vectors but no ``vectors_for`` (or no source) is given.
    """
    needed = model.needs_vectors or model.retrieval == "multimodal"
    if multimodal_from_retriever and model.retrieval == "multimodal":
        needed = False
    if not needed:
        return None
    if vectors_for is None or source is None:
        raise ConfigurationError(
            f"run of model {model.name!r} reads the item vectors of source {source!r}: pass vectors_for= "
            "(e.g. functools.partial(item_vectors, settings) from the embedding stage)"
        )
    return vectors_for(source, dataset)


def background(items: Iterable[Any], fn: Callable[[Any], Any], depth: int = 2) -> Iterator[Any]:
    """``(item, fn(item))`` for each item, computed ``depth`` items ahead in a background thread, so that
    building the next batch (memory-bound gathers, the GSU) overlaps the training step. Errors in the
    thread are re-raised in the caller."""
    return ahead(((item, fn(item)) for item in items), depth, name="ranker-batches")
