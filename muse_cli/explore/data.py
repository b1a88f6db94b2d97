"""What the explorer's pages show, as plain values: no web framework here (the bench and the tests call it
directly).

:class:`Explorer` reads the stores the CLI reads: the data sets under ``$MUSE_DATA_DIR/datasets``, the
metadata database (live source versions, source metrics, comparisons, ranker runs) and Milvus through one
:class:`retriever.client.Retriever` per (data set, live source), kept open between requests so that a
user's history is cached after the first page. Every parameter coming from a URL is validated here and a
bad one is a :class:`muse.errors.MuseError` whose message is the CLI's error sentence.

Ground truth: a simworld data set ships its generator's item table (``truth/items.parquet``: each item's
interest key = leaf category x colour). A retrieved behaviour *shares the target's interest* when its item
has the target item's key; a column's precision@K is the share of its retrieved behaviours that do.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from muse.arrays import check_k, lookup_sorted
from muse.errors import ConfigurationError, MuseError, NotFoundError
from muse.settings import Settings

log = logging.getLogger(__name__)

#: Behaviours per column when the URL gives no ``k`` (the paper's K), and the most a page shows.
K_DEFAULT = 50
K_MAX = 200
#: Column order of the built-in sources; other (imported) sources follow alphabetically.
SOURCE_ORDER = ("id", "scl", "i2i", "openclip")
#: Nearest neighbours shown per item on /sources, items shown by default, and the most a URL may ask for.
NEIGHBOURS = 6
SAMPLE_ITEMS = 4
MAX_SAMPLE_ITEMS = 8
#: Seconds the list of a data set's live sources is reused before the database is asked again.
LIVE_TTL_S = 5.0
#: A data set whose image shards total at most this many bytes is held in memory whole after the first
#: image request; larger ones keep an LRU of this many bytes.
IMAGE_CACHE_BYTES = 64 << 20
#: Bytes of cached histories per (data set, source) retriever.
RETRIEVER_CACHE_BYTES = 512 << 20
#: Impressions offered to pick a target from, and example users offered on a data set's /user page.
MAX_PICKS = 40
EXAMPLE_USERS = 8
#: The ids a URL may carry: int64, negative ones included (Taobao-MM's anonymised ids are).
MIN_ID, MAX_ID = -(1 << 63), (1 << 63) - 1
_INT = re.compile(r"[+-]?\d+")


# --- parameters --------------------------------------------------------------------------------


def parse_int(raw: str | None, name: str, *, lo: int = MIN_ID, hi: int = MAX_ID) -> int | None:
    """A URL parameter as an int in ``lo..hi`` (None when absent or empty).

    Raises:
        ConfigurationError: not an integer, or out of range (naming the parameter and the value).
    """
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    if len(text) > 40 or not _INT.fullmatch(text):
        raise ConfigurationError(f"{name} must be an integer{_range(lo, hi)}, got {shown!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigurationError(f"{name} must be an integer{_range(lo, hi)}, got {value}")
    return value


def _range(lo: int, hi: int) -> str:
    return "" if (lo, hi) == (MIN_ID, MAX_ID) else f" in {lo}..{hi}"


def parse_k(raw: str | None) -> int:
    """``k`` from a URL: :data:`K_DEFAULT` when absent, else an integer in 1..:data:`K_MAX`."""
    if raw is None or raw.strip() == "":
        return K_DEFAULT
    text = raw.strip()
    if len(text) > 40 or not _INT.fullmatch(text):
        check_k(text[:40], K_MAX)  # raises the retriever's sentence: "k must be an integer in 1..200, got '...'"
    return check_k(int(text), K_MAX)


def parse_id_list(raw: str | None, name: str, limit: int) -> list[int] | None:
    """A comma-separated list of ids (None when absent), at most ``limit`` of them."""
    if raw is None or raw.strip() == "":
        return None
    parts = [p for p in raw.split(",") if p.strip()]
    if len(parts) > limit:
        raise ConfigurationError(f"{name} lists {len(parts)} ids; at most {limit} are shown")
    return [int(parse_int(p, name)) for p in parts]  # type: ignore[arg-type]


def source_sort_key(name: str) -> tuple[int, str]:
    return (SOURCE_ORDER.index(name) if name in SOURCE_ORDER else len(SOURCE_ORDER), name)


# --- values the templates show ------------------------------------------------------------------


@dataclass(frozen=True)
class ItemInfo:
    """An item as pages show it."""

    item_id: int
    category: int | None  # None: not an item of the data set
    category_name: str
    title: str | None
    interest: int | None  # simworld interest key (leaf x colour); None without ground truth
    interest_name: str | None


@dataclass(frozen=True)
class HitView:
    """One retrieved behaviour of a column."""

    rank: int
    item: ItemInfo
    score: float
    position: int
    age: int | None  # behaviours after it in the history (0 = the newest); None when the length is unknown
    shared: bool | None  # shares the target's interest; None without ground truth


@dataclass(frozen=True)
class Tier:
    """One bar of a SimTier histogram (cosines in ``(low, high]``)."""

    index: int
    low: float
    high: float
    count: int
    height: float  # 0..1 of the tallest bar


@dataclass
class Column:
    """One live source's answer for (user, target)."""

    source: str
    version: int | None = None
    hits: list[HitView] = field(default_factory=list)
    tiers: list[Tier] = field(default_factory=list)
    n_shared: int | None = None
    precision: float | None = None
    history_length: int | None = None
    seconds: float = 0.0
    note: str | None = None  # e.g. the user has no behaviours in this source
    error: str | None = None  # the error sentence when the search failed (the page still renders)


@dataclass(frozen=True)
class Pick:
    """A test impression of the user, offered as a target."""

    item: ItemInfo
    label: int
    current: bool


@dataclass
class UserPage:
    dataset: str
    kind: str
    has_images: bool
    has_truth: bool
    k: int
    user: int | None
    history_length: int | None = None
    target: ItemInfo | None = None
    target_label: int | None = None  # the target's label when it is a test impression of the user
    interest_in_history: int | None = None  # behaviours of the history sharing the target's interest
    columns: list[Column] = field(default_factory=list)
    picks: list[Pick] = field(default_factory=list)
    n_test_impressions: int = 0
    examples: list[tuple[int, int]] = field(default_factory=list)  # (user, history length) to start from
    live: list[str] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0


@dataclass
class NeighbourRow:
    item: ItemInfo
    by_source: dict[str, list[tuple[ItemInfo, float, bool | None]]]  # source -> (neighbour, cosine, shared)
    errors: dict[str, str]


@dataclass
class SourcesPage:
    dataset: str
    kind: str
    has_images: bool
    has_truth: bool
    rows: list[dict[str, Any]]  # one per source version trained on / live for the data set
    live: list[str]
    neighbours: list[NeighbourRow]
    mark: str  # what a marked neighbour shares: "interest" (simworld) or "category"


def simtier_bars(counts: Sequence[float]) -> list[Tier]:
    """The SimTier counts as histogram bars: tier ``t`` holds cosines in ``((t-11)/10, (t-10)/10]``
    (``tier = ceil(cos * 10) + 10``, the retriever's and the ranker's definition)."""
    values = [int(c) for c in counts]
    top = max(values) if values and max(values) > 0 else 1
    return [Tier(t, (t - 11) / 10, (t - 10) / 10, c, c / top) for t, c in enumerate(values)]


# --- one data set's tables, read once -------------------------------------------------------------


class DatasetView:
    """A data set's items (and ground truth), users, test impressions and images, read once and looked
    up by id. Built on the first page that needs it; the parts only some pages use load lazily."""

    def __init__(self, dataset: Any) -> None:
        import pyarrow.parquet as pq

        self.dataset = dataset
        self.name: str = dataset.name
        self.kind: str = dataset.kind
        self.has_images = bool(dataset.meta.get("has_images"))
        items = dataset.items().select(["item_id", "category", "title"])
        ids = items.column("item_id").to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        self.item_ids = ids[order]
        self.categories = items.column("category").to_numpy().astype(np.int64)[order]
        self.titles: list[str | None] = items.column("title").take(order).to_pylist()
        world = dataset.meta.get("world") or {}
        self.leaves_per_top: int | None = world.get("leaves_per_top") if self.kind == "simworld" else None
        self.interest: np.ndarray | None = None
        self.interest_names: dict[int, str] = {}
        truth = dataset.truth_path("items")
        if truth is not None:
            from muse.data.simworld_vocab import interest_label

            t = pq.read_table(truth, columns=["item_id", "leaf", "colour", "key"])
            pos, found = lookup_sorted(self.item_ids, t.column("item_id").to_numpy())
            interest = np.full(len(self.item_ids), -1, dtype=np.int64)
            interest[pos[found]] = t.column("key").to_numpy()[found]
            self.interest = interest
            for key, leaf, colour in set(zip(t.column("key").to_pylist(), t.column("leaf").to_pylist(),
                                             t.column("colour").to_pylist())):
                self.interest_names[int(key)] = interest_label(leaf, colour, self.leaves_per_top or 5)
        self.stamp: int | None = None  # meta.json's mtime when read (set by Explorer.view)
        self._lock = threading.Lock()
        self._users: tuple[np.ndarray, np.ndarray] | None = None
        self._impressions: tuple[np.ndarray, ...] | None = None
        self._images: OrderedDict[int, bytes] = OrderedDict()
        self._images_bytes = 0
        self._all_images: bool | None = None

    @property
    def has_truth(self) -> bool:
        return self.interest is not None

    # items ------------------------------------------------------------------------------------------
    def category_name(self, category: int | None) -> str:
        if category is None:
            return "-"
        if self.leaves_per_top:
            from muse.data.simworld_vocab import category_label

            return category_label(category, self.leaves_per_top)
        return f"category {category}"

    def has_item(self, item_id: int) -> bool:
        return bool(lookup_sorted(self.item_ids, np.asarray([item_id]))[1][0])

    def check_item(self, item_id: int) -> None:
        if not self.has_item(item_id):
            span = f" (its item ids run {self.item_ids[0]}..{self.item_ids[-1]})" if len(self.item_ids) else ""
            raise NotFoundError(f"dataset {self.name!r} has no item {item_id}{span}")

    def items(self, item_ids: Sequence[int] | np.ndarray) -> list[ItemInfo]:
        """:class:`ItemInfo` of each id, in order (an id that is not an item gets category None)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        pos, found = lookup_sorted(self.item_ids, ids)
        out = []
        for i, p, ok in zip(ids.tolist(), pos.tolist(), found.tolist()):
            if not ok:
                out.append(ItemInfo(i, None, "not an item of the data set", None, None, None))
                continue
            cat = int(self.categories[p])
            key = None if self.interest is None or self.interest[p] < 0 else int(self.interest[p])
            out.append(ItemInfo(i, cat, self.category_name(cat), self.titles[p], key,
                                None if key is None else self.interest_names.get(key)))
        return out

    def sample_items(self, n: int) -> list[int]:
        """``n`` items spread evenly over the catalogue (the default items of /sources)."""
        if len(self.item_ids) == 0:
            return []
        idx = np.unique(np.linspace(0, len(self.item_ids) - 1, num=min(n, len(self.item_ids))).astype(np.int64))
        return [int(i) for i in self.item_ids[idx]]

    # users ------------------------------------------------------------------------------------------
    def _user_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted user ids, their rows in the canonical history order)."""
        with self._lock:
            if self._users is None:
                parts = [b.column("user_id").to_numpy() for b in
                         self.dataset.iter_histories(batch_size=65_536, columns=["user_id"])]
                ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
                order = np.argsort(ids, kind="stable")
                self._users = (ids[order], order.astype(np.int64))
            return self._users

    def check_user(self, user_id: int) -> int:
        """The user's row in the history order.

        Raises:
            NotFoundError: the data set has no such user (naming the range of its user ids).
        """
        ids, rows = self._user_index()
        pos, found = lookup_sorted(ids, np.asarray([user_id]))
        if not found[0]:
            span = f" (its user ids run {ids[0]}..{ids[-1]})" if len(ids) else " (it has no users)"
            raise NotFoundError(f"dataset {self.name!r} has no user {user_id}{span}")
        return int(rows[pos[0]])

    def history(self, user_id: int) -> np.ndarray:
        """The user's behaviour item ids, oldest first."""
        row = self.check_user(user_id)
        for batch in self.dataset.iter_histories(batch_size=1, start=row, stop=row + 1, columns=["item_ids"]):
            return np.asarray(batch.column("item_ids")[0].values.to_numpy(), dtype=np.int64)
        return np.zeros(0, np.int64)

    def interest_of(self, item_ids: np.ndarray) -> np.ndarray | None:
        """Interest key per item id (-1 for unknown ids); None without ground truth."""
        if self.interest is None:
            return None
        pos, found = lookup_sorted(self.item_ids, item_ids)
        return np.where(found, self.interest[pos], -1)

    # test impressions -------------------------------------------------------------------------------
    def _impression_index(self) -> tuple[np.ndarray, ...]:
        """Test impressions sorted by user: (users, items, labels, hist_len)."""
        with self._lock:
            if self._impressions is None:
                users, items, labels, lens = [], [], [], []
                for b in self.dataset.iter_impressions(split="test"):
                    users.append(b.column("user_id").to_numpy())
                    items.append(b.column("item_id").to_numpy())
                    labels.append(b.column("label").to_numpy())
                    lens.append(b.column("hist_len").to_numpy())
                if users:
                    u = np.concatenate(users).astype(np.int64)
                    order = np.argsort(u, kind="stable")
                    self._impressions = (u[order], np.concatenate(items).astype(np.int64)[order],
                                         np.concatenate(labels).astype(np.int8)[order],
                                         np.concatenate(lens).astype(np.int64)[order])
                else:
                    empty = np.zeros(0, np.int64)
                    self._impressions = (empty, empty, empty.astype(np.int8), empty)
            return self._impressions

    def test_impressions(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(item ids, labels) of the user's test impressions, in the data set's order."""
        users, items, labels, _ = self._impression_index()
        lo, hi = np.searchsorted(users, user_id, "left"), np.searchsorted(users, user_id, "right")
        return items[lo:hi], labels[lo:hi]

    def example_users(self, n: int) -> list[tuple[int, int]]:
        """(user, history length at the impression) of ``n`` test users with a click, longest history first."""
        users, _, labels, lens = self._impression_index()
        clicked = labels > 0
        if not clicked.any():
            clicked = np.ones(len(users), bool)
        best: dict[int, int] = {}
        for u, n_hist in zip(users[clicked].tolist(), lens[clicked].tolist()):
            if n_hist > best.get(u, -1):
                best[u] = n_hist
        return sorted(best.items(), key=lambda t: (-t[1], t[0]))[:n]

    # images -----------------------------------------------------------------------------------------
    def image(self, item_id: int) -> bytes | None:
        """The item's image bytes (None when the data set has no image for it)."""
        if not self.has_images:
            return None
        with self._lock:
            if self._all_images is None:
                shards = list((self.dataset.path / "images").glob("part-*.parquet"))
                self._all_images = sum(p.stat().st_size for p in shards) <= IMAGE_CACHE_BYTES
                if self._all_images:
                    for batch in self.dataset.iter_images(batch_size=4096):
                        for i, img in zip(batch.column("item_id").to_pylist(), batch.column("image").to_pylist()):
                            self._images[int(i)] = img
            if item_id in self._images:
                if not self._all_images:
                    self._images.move_to_end(item_id)
                return self._images[item_id]
            if self._all_images or not self.has_item(item_id):
                return None
        found = self.dataset.load_images([item_id]).get(item_id)
        if found is not None:
            with self._lock:
                self._images[item_id] = found
                self._images_bytes += len(found)
                while self._images_bytes > IMAGE_CACHE_BYTES and self._images:
                    _, old = self._images.popitem(last=False)
                    self._images_bytes -= len(old)
        return found


# --- the explorer -------------------------------------------------------------------------------------


class Explorer:
    """The pages' data, read-only, from the stores ``settings`` point at. Thread-safe; call :meth:`close`
    at the end (it closes the retrievers and the Milvus connection)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._make_lock = threading.Lock()
        self._views: dict[str, DatasetView] = {}
        self._view_locks: dict[str, threading.Lock] = {}
        self._retrievers: dict[tuple[str, str], Any] = {}
        self._live: dict[str, tuple[float, dict[str, int]]] = {}
        self._store: Any = None

    # shared handles -------------------------------------------------------------------------------
    @property
    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                from muse.vectorstore import VectorStore

                self._store = VectorStore(self.settings)
            return self._store

    def view(self, dataset: str | None) -> DatasetView:
        """The data set's :class:`DatasetView` (read on first use).

        Raises:
            ConfigurationError: no ``dataset`` given. DataError: an invalid name. NotFoundError: no such data set.
        """
        from muse.data.format import Dataset, check_name

        if dataset is None or dataset.strip() == "":
            raise ConfigurationError("dataset is required, e.g. ?dataset=NAME (see `muse data list`)")
        check_name(dataset)
        stamp = self._stamp(dataset)
        with self._lock:
            found = self._views.get(dataset)
            if found is not None and found.stamp == stamp:
                return found
            lock = self._view_locks.setdefault(dataset, threading.Lock())
        with lock:
            with self._lock:
                found = self._views.get(dataset)
                if found is not None and found.stamp == stamp:
                    return found
            built = DatasetView(Dataset.open(self.settings, dataset))
            built.stamp = stamp
            with self._lock:
                self._views[dataset] = built
            return built

    def _stamp(self, dataset: str) -> int | None:
        """When the data set's ``meta.json`` was written (a regenerated data set is read again)."""
        from muse.data.format import META_FILE, datasets_root

        try:
            return (datasets_root(self.settings) / dataset / META_FILE).stat().st_mtime_ns
        except OSError:
            return None

    def live_sources(self, dataset: str) -> dict[str, int]:
        """The data set's live source versions from the metadata database, in column order
        (re-read every :data:`LIVE_TTL_S` seconds; an unmigrated database has none)."""
        now = time.monotonic()
        with self._lock:
            cached = self._live.get(dataset)
            if cached is not None and now - cached[0] < LIVE_TTL_S:
                return cached[1]
        from sqlalchemy import select

        from muse import models
        from muse.data.registry import database_ready
        from muse.db import session_scope

        live: dict[str, int] = {}
        if database_ready(self.settings):
            with session_scope(self.settings) as session:
                rows = session.execute(
                    select(models.LiveVersion.source_name, models.LiveVersion.version)
                    .join(models.Dataset, models.Dataset.id == models.LiveVersion.dataset_id)
                    .where(models.Dataset.name == dataset)
                ).all()
            live = {name: int(v) for name, v in sorted(rows, key=lambda r: source_sort_key(r[0]))}
        with self._lock:
            self._live[dataset] = (now, live)
        return live

    def retriever(self, dataset: str, source: str) -> Any:
        """The open retriever of (data set, source), following its live version (created on first use).

        Raises:
            NotFoundError: the source has no live version (or its collections are gone).
        """
        key = (dataset, source)
        with self._lock:
            found = self._retrievers.get(key)
        if found is not None:
            return found
        from retriever.cache import CacheConfig
        from retriever.client import Retriever

        with self._make_lock:  # one retriever per key, made once
            with self._lock:
                found = self._retrievers.get(key)
            if found is not None:
                return found
            config = CacheConfig(device=self.settings.resolve_device(), capacity_bytes=RETRIEVER_CACHE_BYTES)
            made = Retriever(self.store, source, dataset=dataset, cache_config=config)
            with self._lock:
                self._retrievers[key] = made
            return made

    def prefetch(self, dataset: str, user: int) -> None:
        """Start loading the user's history into every live source's cache (a page with targets to pick)."""
        for source in self.live_sources(dataset):
            try:
                self.retriever(dataset, source).prefetch([user])
            except MuseError as e:
                log.info("prefetch of user %d in %s/%s skipped: %s", user, dataset, source, e)

    def close(self) -> None:
        with self._lock:
            retrievers, self._retrievers = list(self._retrievers.values()), {}
            store, self._store = self._store, None
        for r in retrievers:
            r.close()  # its view, then the shared store (closing that again below is harmless)
        if store is not None:
            store.close()

    # pages ----------------------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        """The data sets with their live sources, the sources trained for them but not live, and comparisons."""
        from muse.data.registry import database_ready, list_datasets

        datasets = list_datasets(self.settings)
        ready = database_ready(self.settings)
        trained: dict[str, list[str]] = {}
        comparisons: dict[str, int] = {}
        if ready:
            from sqlalchemy import func, select

            from indexer.source_registry import list_versions
            from muse import models
            from muse.db import session_scope

            with session_scope(self.settings) as session:
                names = {d.id: d.name for d in session.scalars(select(models.Dataset))}
                counted = session.execute(select(models.Comparison.dataset_id, func.count())
                                          .group_by(models.Comparison.dataset_id)).all()
            comparisons = {names[i]: int(n) for i, n in counted if i in names}
            for v in list_versions(self.settings):
                ds_name = names.get(v.dataset_id)
                if ds_name is not None and v.name not in trained.setdefault(ds_name, []):
                    trained[ds_name].append(v.name)
        for d in datasets:
            d["live"] = self.live_sources(d["name"]) if ready else {}
            d["not_live"] = sorted((s for s in trained.get(d["name"], []) if s not in d["live"]), key=source_sort_key)
            d["comparisons"] = comparisons.get(d["name"], 0)
        return {"datasets": datasets, "database_ready": ready, "database_url": self._database_url()}

    def _database_url(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.settings.database_url).render_as_string(hide_password=True)

    def user_page(self, dataset: str | None, user: int | None, item: int | None, k: int) -> UserPage:
        """The /user page: the target item, one column per live source, the test impressions to pick from.

        Raises:
            ConfigurationError, DataError: a bad parameter. NotFoundError: unknown data set, user or item.
        """
        started = time.perf_counter()
        view = self.view(dataset)
        live = self.live_sources(view.name)
        page = UserPage(view.name, view.kind, view.has_images, view.has_truth, k, user, live=list(live))
        if user is None:
            if item is not None:
                raise ConfigurationError("user is required when item is given, e.g. ?dataset=D&user=U&item=I")
            page.examples = view.example_users(EXAMPLE_USERS)
            page.seconds = time.perf_counter() - started
            return page
        view.check_user(user)
        if item is not None:
            view.check_item(item)
        history = view.history(user)
        page.history_length = int(len(history))
        items, labels = view.test_impressions(user)
        page.n_test_impressions = int(len(items))
        order = np.argsort(-labels, kind="stable")[:MAX_PICKS]  # clicked first, then the data set's order
        infos = view.items(items[order])
        page.picks = [Pick(info, int(labels[i]), item is not None and info.item_id == item)
                      for info, i in zip(infos, order.tolist())]
        if not live:
            page.note = (f"dataset {view.name!r} has no live source: run `muse backfill --source scl --dataset "
                         f"{view.name}` (the first backfill of a source becomes live)")
        if item is None:
            self.prefetch(view.name, user)
            page.seconds = time.perf_counter() - started
            return page
        page.target = view.items([item])[0]
        hit = np.flatnonzero(items == item)
        page.target_label = int(labels[hit].max()) if len(hit) else None
        keys = view.interest_of(history)
        if keys is not None and page.target.interest is not None:
            page.interest_in_history = int((keys == page.target.interest).sum())
        page.columns = [self._column(view, source, user, item, k) for source in live]
        page.seconds = time.perf_counter() - started
        return page

    def _column(self, view: DatasetView, source: str, user: int, item: int, k: int) -> Column:
        """One source's top-``k`` for (user, item); a failed search becomes the column's error sentence."""
        col = Column(source)
        started = time.perf_counter()
        try:
            result = self.retriever(view.name, source).search(user, [item], k=k)
        except MuseError as e:
            col.error = f"error: {e}"
            return col
        finally:
            col.seconds = time.perf_counter() - started
        col.version = result.version
        col.history_length = result.history_length
        hits = result[0]
        if not result.found:
            col.note = (f"user {user} has no behaviours in {view.name}/{source} v{result.version} "
                        "(is the backfill finished? `muse backfill list`)")
            return col
        infos = view.items(hits.behaviour_item_ids)
        target_key = view.items([item])[0].interest
        length = result.history_length
        for rank, (info, pos, score) in enumerate(zip(infos, hits.positions.tolist(), hits.scores.tolist()), 1):
            shared = None if target_key is None else info.interest == target_key
            age = None if length is None else int(length) - 1 - int(pos)
            col.hits.append(HitView(rank, info, float(score), int(pos), age, shared))
        col.tiers = simtier_bars(hits.simtier)
        if target_key is not None and col.hits:
            col.n_shared = sum(bool(h.shared) for h in col.hits)
            col.precision = col.n_shared / len(col.hits)
        return col

    def sources_page(self, dataset: str | None, items: list[int] | None) -> SourcesPage:
        """The /sources page: each source version's intrinsic metrics on the data set and, per live source,
        the nearest neighbours of a few items.

        Raises:
            ConfigurationError, DataError: a bad parameter. NotFoundError: unknown data set or item.
        """
        view = self.view(dataset)
        for i in items or []:
            view.check_item(i)
        wanted = items or view.sample_items(SAMPLE_ITEMS)
        live = self.live_sources(view.name)
        page = SourcesPage(view.name, view.kind, view.has_images, view.has_truth, self._source_rows(view.name, live),
                           list(live), [], "interest" if view.has_truth else "category")
        infos = view.items(wanted)
        rows = [NeighbourRow(info, {}, {}) for info in infos]
        for source in live:
            try:
                found = self._neighbours(view, source, wanted)
            except MuseError as e:
                for row in rows:
                    row.errors[source] = f"error: {e}"
                continue
            for row, hits in zip(rows, found):
                if isinstance(hits, str):
                    row.errors[source] = hits
                    continue
                shown = view.items([h.item_id for h in hits])
                row.by_source[source] = [
                    (n, h.score, (n.interest == row.item.interest) if view.has_truth else (n.category == row.item.category))
                    for n, h in zip(shown, hits)
                ]
        page.neighbours = rows
        return page

    def _neighbours(self, view: DatasetView, source: str, items: list[int]) -> list[Any]:
        """Per item, its :data:`NEIGHBOURS` nearest other items in the live version of ``source`` (or a
        sentence when the item has no vector there)."""
        rview = self.retriever(view.name, source).view()
        vectors = rview.target_vectors(items, missing="zero")  # [n, d]
        has = np.any(vectors != 0, axis=1)
        out: list[Any] = [f"item {i} has no {source!r} vector in v{rview.version}" for i in items]
        if has.any():
            found = self.store.search_items(rview.ref, vectors[has], NEIGHBOURS + 1)
            for slot, hits in zip(np.flatnonzero(has).tolist(), found):
                out[slot] = [h for h in hits if h.item_id != items[slot]][:NEIGHBOURS]
        return out

    def _source_rows(self, dataset: str, live: dict[str, int]) -> list[dict[str, Any]]:
        """One row per source version trained on the data set or live for it: training and intrinsic metrics."""
        from muse.data.registry import database_ready

        if not database_ready(self.settings):
            return []
        from indexer.source_registry import dataset_row_id, list_versions

        ds_id = dataset_row_id(self.settings, dataset)
        rows = []
        for v in list_versions(self.settings):
            if v.dataset_id != ds_id and live.get(v.name) != v.version:
                continue
            train = v.metrics.get("train") or {}
            ev = (v.metrics.get("eval") or {}).get(dataset) or {}
            rows.append({"source": v.name, "version": v.version, "kind": v.kind, "dim": v.dim,
                         "live": live.get(v.name) == v.version, "train": train, "eval": ev})
        rows.sort(key=lambda r: (source_sort_key(r["source"]), -r["version"]))
        return rows

    def comparisons(self) -> list[dict[str, Any]]:
        from muse.data.registry import database_ready
        from ranker.compare import list_comparisons

        if not database_ready(self.settings):
            return []
        return list_comparisons(self.settings)

    def comparison(self, comparison_id: int) -> dict[str, Any]:
        """A stored comparison (``muse compare --show``) with its chart's bars and its options as TOML.

        Raises:
            NotFoundError: no such comparison.
        """
        from muse_cli.config_files import dumps_toml
        from ranker.compare import INTRINSIC_METRICS, get_comparison, verdict

        result = get_comparison(self.settings, comparison_id)
        cells = []
        for c in result.get("cells", []):
            g = c["metrics"]["gauc"]
            cells.append({**c, "label": f"{c['model']} ({c['esu']})" + (f" / {c['source']}" if c.get("source") else ""),
                          "verdict": verdict(g)})
        cli = (result.get("spec") or {}).get("config") or {}
        options = dumps_toml(cli.get("options") or {}) if cli else None
        return {**result, "cells": cells, "bars": gauc_bars(cells), "options": options, "cli": cli,
                "intrinsic_metrics": INTRINSIC_METRICS}

    def run(self, run_id: int) -> dict[str, Any]:
        """A ranker run as ``muse rank show`` prints it: the record, its metrics and its options as TOML.

        Raises:
            NotFoundError: no such run.
        """
        from muse_cli.config_files import dumps_toml
        from ranker.runs import get_run

        r = get_run(self.settings, run_id)
        cli = r.config.get("cli") or {}
        setup = {k: v for k, v in r.config.items() if k != "cli" and isinstance(v, dict)}
        return {"run": r, "cli": cli, "options": dumps_toml(cli.get("options") or {}) if cli else None,
                "setup": dumps_toml(setup) if setup else None,
                "slices": [(name, r.metrics[name]) for name in ("overall", "long_tail", "long_history")
                           if isinstance(r.metrics.get(name), dict)]}


def gauc_bars(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bars of mean GAUC with the spread over seeds, on an axis from 0 to 1 (as ``ranker.compare.render_plot``)."""
    bars = []
    for c in cells:
        g = c["metrics"]["gauc"]
        if g.get("mean") is None:
            continue
        std = g.get("std") or 0.0
        bars.append({"label": c["label"], "mean": g["mean"], "std": std, "low": max(0.0, g["mean"] - std),
                     "high": min(1.0, g["mean"] + std), "source": c.get("source")})
    return bars
