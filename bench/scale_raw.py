"""Raw Taobao-MM files at a fraction of the open data set's size, written in bounded memory.

At fraction ``f`` the files hold what the open Taobao-MM holds times ``f``: ``9M·f`` users,
``35M·f`` items and ``1B·f`` samples split 80/20 into ``train_samples`` and ``test_samples``, in
the raw schema ``muse data taobao-mm`` reads (``muse/data/taobao_mm.py``):

* ``train_user_features`` / ``test_user_features``: one row per user, ``129_1``, ``130_1``..``130_5``
  and the histories ``150_2_180`` (items) / ``151_2_180`` (their categories), oldest first. Train
  histories have 100-950 behaviours (uniform); each user's test row extends the train row by 1-50
  newer behaviours (so test histories are the longer ones, 101-1,000, as in the release);
* ``train_samples`` / ``test_samples``: ``label_0`` one-hot ``[no click, click]`` list<int8>,
  ``129_1``, ``205``; users uniform, in random order (the import's join sees no grouping);
* ``item_features``: ``205``, ``206`` (category), ``213``, ``214``;
* ``scl_embedding_int8_p90``: ``205``, ``205_c`` list<int8>[128] quantised as trunc(x * 127), for
  about 90% of the items (the rest have none, as in the release).

Nothing sized by the data is held: every id is a bijective 64-bit hash of a row index (so users,
items and categories are never stored to be looked up), and each table is written chunk by chunk
(``chunk_users`` user rows, ``chunk_rows`` sample rows, ``chunk_items`` item rows: one parquet row
group each), every chunk from its own random stream seeded by (seed, table, chunk): two runs with
the same seed and chunk sizes write the same rows. Peak memory is set by the chunk sizes, not by
the data: 0.35-0.39 GB with the defaults from f = 0.001 to f = 0.03 (``/usr/bin/time``, 2026-12-04).

Popularity is long-tailed: categories and the items within a category are drawn as
``floor(n * u ** 3)`` (about a fifth of the draws fall on the most popular 1%). Every user has four
interest categories that 70% of the history and half of the samples come from; a sample's click
probability is 12% on an interest category and 3% elsewhere, so a ranker has something to learn.

    python -m bench.scale_raw --fraction 0.001 --out /tmp/tb-0.001      # 9K users, 35K items, 1M samples
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: The open Taobao-MM at f = 1 (the figures issue 20 sizes the project against).
FULL_USERS, FULL_ITEMS, FULL_SAMPLES = 9_000_000, 35_000_000, 1_000_000_000
TRAIN_SHARE = 0.8  # samples in train_samples, the rest in test_samples
HIST_MIN, HIST_MAX = 100, 950  # train history lengths (inclusive)
TEST_EXTRA_MIN, TEST_EXTRA_MAX = 1, 50  # newer behaviours the test row adds (test lengths 101-1,000)
SCL_SHARE = 0.9  # items with an SCL vector
DIM = 128  # SCL vector width (as released)
SCL_SCALE = 127.0  # quantisation: trunc(x * 127)
ITEMS_PER_CATEGORY = 500
N_INTERESTS = 4  # interest categories per user
P_INTEREST_HISTORY, P_INTEREST_SAMPLE = 0.7, 0.5
CTR_INTEREST, CTR_OTHER = 0.12, 0.03
POPULARITY_EXPONENT = 3.0  # index = floor(n * u ** 3): long-tailed popularity
USER_FEATURE_VOCABS = (2, 8, 10, 50, 1_000)  # values of 130_1..130_5
ITEM_FEATURE_VOCABS = (500, 35)  # values of 213, 214

# Salts of the id hashes (distinct tables, distinct ids; any value >= 1 keeps ids non-zero).
_SALT = {"user": 1, "item": 1 << 40, "cat": 2 << 40, "ufeat": 3 << 40, "ifeat": 4 << 40, "vec": 5 << 40,
         "interest": 6 << 40}
# Codes of the per-chunk random streams.
_STREAM = {"users": 1, "train_samples": 2, "test_samples": 3, "items": 4}

RAW_TABLES = ("train_samples", "test_samples", "train_user_features", "test_user_features", "item_features",
              "scl_embedding_int8_p90")
MARKER = "scale-raw.json"


@dataclass(frozen=True)
class RawSpec:
    """Sizes of one generated set (see :meth:`at`)."""

    fraction: float
    n_users: int
    n_items: int
    n_samples: int
    n_cats: int
    seed: int = 0
    chunk_users: int = 2_048  # user rows per row group (a row holds up to 1,000 behaviours twice)
    chunk_rows: int = 262_144  # sample rows per row group
    chunk_items: int = 32_768  # item rows per row group (each with a 128-d vector made in float32)

    @classmethod
    def at(cls, fraction: float, seed: int = 0, chunk_users: int = 2_048, chunk_rows: int = 262_144,
           chunk_items: int = 32_768) -> RawSpec:
        """The sizes at ``fraction`` of the open data set (at least one user, one category, two items)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if min(chunk_users, chunk_rows, chunk_items) < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {chunk_users}, {chunk_rows} and {chunk_items}")
        n_items = max(2, round(FULL_ITEMS * fraction))
        return cls(fraction=fraction, n_users=max(1, round(FULL_USERS * fraction)), n_items=n_items,
                   n_samples=max(2, round(FULL_SAMPLES * fraction)), n_cats=max(1, n_items // ITEMS_PER_CATEGORY),
                   seed=seed, chunk_users=chunk_users, chunk_rows=chunk_rows, chunk_items=chunk_items)

    @property
    def n_train(self) -> int:
        return round(self.n_samples * TRAIN_SHARE)

    @property
    def n_test(self) -> int:
        return self.n_samples - self.n_train

    def same_data(self, other: dict[str, Any]) -> bool:
        """Whether a marker's spec describes the same files (chunk sizes aside)."""
        mine = {k: v for k, v in asdict(self).items() if not k.startswith("chunk_")}
        return all(other.get(k) == v for k, v in mine.items())


# -- ids and draws ----------------------------------------------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 (wrapping arithmetic) that maps only 0 to 0."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hashed_ids(index: np.ndarray, kind: str) -> np.ndarray:
    """Anonymised int64 ids of rows ``index`` of table ``kind``: distinct for distinct rows, never 0."""
    return _mix(np.asarray(index, dtype=np.uint64) + np.uint64(_SALT[kind])).view(np.int64)


def _unit_floats(index: np.ndarray, kind: str) -> np.ndarray:
    """A deterministic uniform [0, 1) value per row of ``kind`` (independent of the ids)."""
    return (_mix(np.asarray(index, dtype=np.uint64) * np.uint64(7) + np.uint64(_SALT[kind] + 3)) >> np.uint64(11)
            ).astype(np.float64) / float(1 << 53)


def category_of(items: np.ndarray, n_cats: int) -> np.ndarray:
    """Category index of item rows (item ``i`` is in category ``i % n_cats``)."""
    return np.asarray(items, dtype=np.int64) % n_cats


def has_vector(items: np.ndarray) -> np.ndarray:
    """Whether item rows ship an SCL vector (about :data:`SCL_SHARE` of them)."""
    return _unit_floats(items, "vec") < SCL_SHARE


def _skewed(rng: np.random.Generator, n: np.ndarray | int, size: int) -> np.ndarray:
    """``size`` long-tailed draws in ``[0, n)`` (``n`` per draw or one for all)."""
    return np.minimum(np.floor(np.asarray(n) * rng.random(size) ** POPULARITY_EXPONENT).astype(np.int64),
                      np.asarray(n) - 1)


def _items_of(rng: np.random.Generator, cats: np.ndarray, spec: RawSpec) -> np.ndarray:
    """A long-tailed item row of each category in ``cats``."""
    per_cat = (spec.n_items - cats + spec.n_cats - 1) // spec.n_cats  # items with i % n_cats == c
    return cats + spec.n_cats * _skewed(rng, per_cat, len(cats))


def interests(users: np.ndarray, spec: RawSpec) -> np.ndarray:
    """The :data:`N_INTERESTS` interest categories of user rows, ``[n, N_INTERESTS]``."""
    u = np.asarray(users, dtype=np.int64)[:, None] * N_INTERESTS + np.arange(N_INTERESTS)
    return np.minimum(np.floor(spec.n_cats * _unit_floats(u, "interest") ** POPULARITY_EXPONENT).astype(np.int64),
                      spec.n_cats - 1)


def _behaviours(rng: np.random.Generator, user_interests: np.ndarray, rows: np.ndarray, spec: RawSpec,
                p_interest: float) -> np.ndarray:
    """One item row per entry of ``rows`` (the entry's user: a row of ``user_interests``, the
    ``[users, N_INTERESTS]`` interest table): one of the user's interests with ``p_interest``, else
    a popular category."""
    n = len(rows)
    mine = user_interests[rows, rng.integers(0, N_INTERESTS, n)]
    cats = np.where(rng.random(n) < p_interest, mine, _skewed(rng, spec.n_cats, n))
    return _items_of(rng, cats, spec)


def _rng(spec: RawSpec, stream: str, chunk: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _STREAM[stream], chunk])


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


# -- chunks ------------------------------------------------------------------------------------------------
def user_chunk(spec: RawSpec, chunk: int) -> tuple[pa.Table, pa.Table]:
    """Train and test user-feature rows of users ``[chunk * chunk_users, ...)``."""
    lo = chunk * spec.chunk_users
    users = np.arange(lo, min(spec.n_users, lo + spec.chunk_users), dtype=np.int64)
    rng = _rng(spec, "users", chunk)
    train_len = rng.integers(HIST_MIN, HIST_MAX + 1, len(users))
    test_len = train_len + rng.integers(TEST_EXTRA_MIN, TEST_EXTRA_MAX + 1, len(users))
    offsets = np.concatenate([[0], np.cumsum(test_len)])
    row = np.repeat(np.arange(len(users)), test_len)  # the user row of each test entry
    items = _behaviours(rng, interests(users, spec), row, spec, P_INTEREST_HISTORY)  # oldest first
    in_train = (np.arange(len(row)) - offsets[row]) < train_len[row]  # the train row is the prefix
    item_ids, cat_ids = hashed_ids(items, "item"), hashed_ids(category_of(items, spec.n_cats), "cat")
    features = {}
    for j, vocab in enumerate(USER_FEATURE_VOCABS):
        value = (_mix(users.astype(np.uint64) * np.uint64(8) + np.uint64(j)) % np.uint64(vocab)).astype(np.int64)
        features[f"130_{j + 1}"] = hashed_ids(value + (j << 20), "ufeat")
    base = {"129_1": hashed_ids(users, "user"), **features}
    train_offsets = np.concatenate([[0], np.cumsum(train_len)])
    train = pa.table({**base, "150_2_180": _list_array(train_offsets, item_ids[in_train]),
                      "151_2_180": _list_array(train_offsets, cat_ids[in_train])})
    test = pa.table({**base, "150_2_180": _list_array(offsets, item_ids), "151_2_180": _list_array(offsets, cat_ids)})
    return train, test


def sample_chunk(spec: RawSpec, split: str, chunk: int) -> pa.Table:
    """Rows ``[chunk * chunk_rows, ...)`` of ``<split>_samples``."""
    total = spec.n_train if split == "train" else spec.n_test
    lo = chunk * spec.chunk_rows
    n = min(total, lo + spec.chunk_rows) - lo
    rng = _rng(spec, f"{split}_samples", chunk)
    users = rng.integers(0, spec.n_users, n)
    mine = interests(users, spec)
    items = _behaviours(rng, mine, np.arange(n), spec, P_INTEREST_SAMPLE)
    hit = (mine == category_of(items, spec.n_cats)[:, None]).any(axis=1)
    click = (rng.random(n) < np.where(hit, CTR_INTEREST, CTR_OTHER)).astype(np.int8)
    onehot = np.stack([1 - click, click], axis=1).reshape(-1)
    return pa.table({"label_0": _list_array(np.arange(0, 2 * n + 1, 2), onehot),
                     "129_1": hashed_ids(users, "user"), "205": hashed_ids(items, "item")})


def item_chunk(spec: RawSpec, chunk: int, centres: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """Rows ``[chunk * chunk_items, ...)`` of ``item_features`` and their ``scl_embedding_int8_p90`` rows."""
    lo = chunk * spec.chunk_items
    items = np.arange(lo, min(spec.n_items, lo + spec.chunk_items), dtype=np.int64)
    ids = hashed_ids(items, "item")
    cats = category_of(items, spec.n_cats)
    feats = {f"21{3 + j}": hashed_ids(_mix(items.astype(np.uint64) * np.uint64(4) + np.uint64(j)).view(np.int64)
                                      % vocab + (j << 20), "ifeat")
             for j, vocab in enumerate(ITEM_FEATURE_VOCABS)}
    features = pa.table({"205": ids, "206": hashed_ids(cats, "cat"), **feats})
    keep = has_vector(items)
    rng = _rng(spec, "items", chunk)
    vec = centres[cats[keep]] + 0.7 * rng.standard_normal((int(keep.sum()), DIM), dtype=np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    q = np.trunc(vec * SCL_SCALE).astype(np.int8).reshape(-1)
    scl = pa.table({"205": ids[keep], "205_c": _list_array(np.arange(0, q.size + 1, DIM), q)})
    return features, scl


def _centres(spec: RawSpec) -> np.ndarray:
    """Unit category centres ``[n_cats, DIM]`` (sized by the category vocabulary, 35M / 500 at f = 1)."""
    c = np.random.default_rng([spec.seed, 99]).standard_normal((spec.n_cats, DIM), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


# -- files -------------------------------------------------------------------------------------------------
def generate_raw(out_dir: str | Path, spec: RawSpec) -> dict[str, Any]:
    """Write the six raw tables of ``spec`` into ``out_dir`` (one ``<table>.parquet`` each, one row
    group per chunk) and ``scale-raw.json``; returns the marker's content (spec, rows, bytes, seconds)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # a half-written set never looks complete
    t0 = time.perf_counter()
    rows: dict[str, int] = {}

    def write(name: str, tables: Any) -> None:
        writer = None
        n = 0
        try:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(out / f"{name}.parquet", table.schema)
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                n += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        rows[name] = n

    n_user_chunks = -(-spec.n_users // spec.chunk_users)
    train_w = test_w = None
    try:
        for c in range(n_user_chunks):
            train, test = user_chunk(spec, c)
            if train_w is None:
                train_w = pq.ParquetWriter(out / "train_user_features.parquet", train.schema)
                test_w = pq.ParquetWriter(out / "test_user_features.parquet", test.schema)
            train_w.write_table(train, row_group_size=train.num_rows)
            test_w.write_table(test, row_group_size=test.num_rows)
    finally:
        for w in (train_w, test_w):
            if w is not None:
                w.close()
    rows["train_user_features"] = rows["test_user_features"] = spec.n_users
    for split, total in (("train", spec.n_train), ("test", spec.n_test)):
        write(f"{split}_samples", (sample_chunk(spec, split, c) for c in range(-(-total // spec.chunk_rows))))
    centres = _centres(spec)
    feat_w = scl_w = None
    n_vectors = 0
    try:
        for c in range(-(-spec.n_items // spec.chunk_items)):
            features, scl = item_chunk(spec, c, centres)
            if feat_w is None:
                feat_w = pq.ParquetWriter(out / "item_features.parquet", features.schema)
                scl_w = pq.ParquetWriter(out / "scl_embedding_int8_p90.parquet", scl.schema)
            feat_w.write_table(features, row_group_size=max(1, features.num_rows))
            scl_w.write_table(scl, row_group_size=max(1, scl.num_rows))
            n_vectors += scl.num_rows
    finally:
        for w in (feat_w, scl_w):
            if w is not None:
                w.close()
    rows["item_features"], rows["scl_embedding_int8_p90"] = spec.n_items, n_vectors
    info = {"spec": asdict(spec), "rows": rows,
            "bytes": {t: (out / f"{t}.parquet").stat().st_size for t in RAW_TABLES},
            "seconds": time.perf_counter() - t0}
    (out / MARKER).write_text(json.dumps(info, indent=2))
    return info


def existing_raw(out_dir: str | Path, spec: RawSpec) -> dict[str, Any] | None:
    """The marker of a complete set of ``spec`` already in ``out_dir``, or None."""
    path = Path(out_dir) / MARKER
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if not spec.same_data(info.get("spec", {})):
        return None
    if not all((Path(out_dir) / f"{t}.parquet").is_file() for t in RAW_TABLES):
        return None
    return info


def raw_files(raw_dir: str | Path) -> list[Path]:
    """Every parquet file of a raw folder (what a bare scan reads)."""
    return sorted(Path(raw_dir).rglob("*.parquet"))


#: Rows per batch of the bare scan: user-feature rows hold two lists of up to 1,000 int64.
SCAN_BATCH_ROWS = {"train_user_features": 2_048, "test_user_features": 2_048}
SCAN_BATCH_DEFAULT = 262_144


def scan_raw(raw_dir: str | Path) -> dict[str, Any]:
    """A bare pyarrow scan: ``iter_batches`` over every file and column of ``raw_dir``, decoding
    every batch; returns rows, bytes on disk and seconds."""
    t0 = time.perf_counter()
    n_rows = n_bytes = 0
    for path in raw_files(raw_dir):
        stem = path.stem.split("-")[0]
        batch = SCAN_BATCH_ROWS.get(stem, SCAN_BATCH_DEFAULT)
        for rb in pq.ParquetFile(path).iter_batches(batch_size=batch):
            n_rows += rb.num_rows
        n_bytes += path.stat().st_size
    return {"rows": n_rows, "bytes": n_bytes, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, required=True, help="fraction of the open data set, e.g. 0.001")
    p.add_argument("--out", required=True, help="folder for the six raw tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-users", type=int, default=2_048, help="user rows per row group (bounds memory)")
    p.add_argument("--chunk-rows", type=int, default=262_144, help="sample rows per row group")
    p.add_argument("--chunk-items", type=int, default=32_768, help="item rows per row group")
    args = p.parse_args(argv)
    info = generate_raw(args.out, RawSpec.at(args.fraction, args.seed, args.chunk_users, args.chunk_rows,
                                             args.chunk_items))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
