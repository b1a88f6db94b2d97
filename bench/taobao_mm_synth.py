"""Synthetic data in the raw Taobao-MM schema, with a known click model, and the baseline check.

The generator writes the six raw tables (``train_samples``, ``test_samples``,
``train_user_features``, ``test_user_features``, ``item_features``, ``scl_embedding_int8_p90``)
that ``muse data taobao-mm DIR`` imports, plus ``truth.parquet`` (every sample's true click
probability) and ``synth.json`` (parameters and the Bayes-oracle GAUC).

The world is built so that the click signal lives where the paper says long-sequence models earn
their keep: every user has three long-term categories, each with a preferred "style" (a
sub-cluster of the category's items), that dominate the history *older* than the last 50
behaviours; the last 50 come mostly from two short-term categories and random ones and rarely
touch the long-term ones. A sample's true click logit is

    -2.2 + 1.4 [target category is long-term] + 1.6 [... and of the preferred style]
         + 0.6 [target category is short-term]

Item vectors (``scl_embedding_int8_p90``, 32-d, int8 / 127 as in the real files, ~8% of items
without one) are the category's centre plus the style's centre plus noise, so the multimodal
cosine tells the style apart and ID embeddings have to learn it from few rows. Test user rows
extend the train rows by 7 behaviours (the real Taobao-MM's test histories are the longer ones).

    python -m bench.taobao_mm_synth generate --out /tmp/tb-synth --users 500
    python -m bench.taobao_mm_synth generate --out /tmp/tb-10k --users 500 --train-per-user 20   # 10K train
    python -m bench.taobao_mm_synth check --users 500 --seeds 0,1,2     # every model vs the oracle
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: click-logit weights of the generator (see the module docstring)
BIAS, W_LONG, W_STYLE, W_SHORT = -2.2, 1.4, 1.6, 0.6


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of the synthetic world."""

    n_users: int = 500
    n_items: int = 6_000
    n_cats: int = 60
    n_styles: int = 4  # sub-clusters per category
    hist_old: int = 250  # behaviours older than the recent window (long-term categories dominate)
    hist_recent: int = 50  # the last behaviours (mostly short-term and random categories)
    test_extra: int = 7  # behaviours the test user rows add after the train rows
    train_per_user: int = 60
    test_per_user: int = 10
    dim: int = 32
    p_old_long: float = 0.85  # an old behaviour is from a long-term category
    p_recent_long: float = 0.08  # a recent behaviour is from a long-term category
    p_recent_short: float = 0.62  # ... from a short-term category (else random)
    p_pref_style: float = 0.75  # a long-term behaviour has the user's preferred style
    missing_vectors: float = 0.08  # items without an SCL vector
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct random non-zero int64 ids (anonymised, as in the real data)."""
    out = np.unique(rng.integers(-(2**62), 2**62, size=2 * n + 16, dtype=np.int64))
    out = out[out != 0]
    return rng.permutation(out)[:n]


def generate(out_dir: str | Path, config: SynthConfig | None = None) -> dict[str, Any]:
    """Write the raw tables into ``out_dir``; return the parameters and the oracle GAUC."""
    from ranker.metrics import auc, gauc

    cfg = config or SynthConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    n_groups = cfg.n_cats * cfg.n_styles

    # items: every (category, style) group has at least one item ------------------------------------
    group = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, cfg.n_items - n_groups)])
    cat, style = group // cfg.n_styles, group % cfg.n_styles
    item_ids, cat_ids = _ids(rng, cfg.n_items), _ids(rng, cfg.n_cats)
    order = np.argsort(group, kind="stable")  # items by group, to sample an item of a group
    g_start = np.searchsorted(group[order], np.arange(n_groups))
    g_count = np.bincount(group, minlength=n_groups)

    def pick(groups: np.ndarray) -> np.ndarray:
        """A uniform random item index of each group."""
        return order[g_start[groups] + (rng.random(groups.shape) * g_count[groups]).astype(np.int64)]

    centre = _unit(rng.normal(size=(cfg.n_cats, cfg.dim)))
    style_centre = _unit(rng.normal(size=(cfg.n_cats, cfg.n_styles, cfg.dim)))
    noise = _unit(rng.normal(size=(cfg.n_items, cfg.dim)))
    vec = _unit(centre[cat] + 0.8 * style_centre[cat, style] + 0.5 * noise)  # cos: same style ~0.87, style ~0.53
    has_vec = rng.random(cfg.n_items) >= cfg.missing_vectors

    # users: three long-term categories with a preferred style, two short-term categories ----------
    n_u = cfg.n_users
    user_ids = _ids(rng, n_u)
    cats_perm = np.argsort(rng.random((n_u, cfg.n_cats)), axis=1)
    long_cats, short_cats = cats_perm[:, :3], cats_perm[:, 3:5]  # [U, 3], [U, 2]
    pref = rng.integers(0, cfg.n_styles, (n_u, 3))  # preferred style per long-term category

    def behaviours(n: int, p_long: float, p_short: float) -> np.ndarray:
        """Item indices ``[U, n]`` of behaviours drawn from the users' interests."""
        u = np.repeat(np.arange(n_u)[:, None], n, axis=1)
        r = rng.random((n_u, n))
        j = rng.integers(0, 3, (n_u, n))
        c = rng.integers(0, cfg.n_cats, (n_u, n))  # random category
        s = rng.integers(0, cfg.n_styles, (n_u, n))
        is_long = r < p_long
        c = np.where(is_long, long_cats[u, j], c)
        s = np.where(is_long & (rng.random((n_u, n)) < cfg.p_pref_style), pref[u, j], s)
        is_short = ~is_long & (r < p_long + p_short)
        c = np.where(is_short, short_cats[u, rng.integers(0, 2, (n_u, n))], c)
        return pick(c * cfg.n_styles + s)

    old = behaviours(cfg.hist_old, cfg.p_old_long, 0.05)
    recent = behaviours(cfg.hist_recent, cfg.p_recent_long, cfg.p_recent_short)
    extra = behaviours(cfg.test_extra, cfg.p_recent_long, cfg.p_recent_short)
    train_hist = np.concatenate([old, recent], axis=1)
    test_hist = np.concatenate([train_hist, extra], axis=1)

    def click_prob(u: np.ndarray, items: np.ndarray) -> np.ndarray:
        c, s = cat[items], style[items]
        in_long = long_cats[u] == c[:, None]  # [N, 3]
        styled = (in_long & (pref[u] == s[:, None])).any(axis=1)
        short = (short_cats[u] == c[:, None]).any(axis=1)
        logit = BIAS + W_LONG * in_long.any(axis=1) + W_STYLE * styled + W_SHORT * short
        return 1.0 / (1.0 + np.exp(-logit))

    def samples(per_user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        u = np.repeat(np.arange(n_u), per_user)
        r = rng.random(len(u))
        c = rng.integers(0, cfg.n_cats, len(u))
        c = np.where(r < 0.4, long_cats[u, rng.integers(0, 3, len(u))], c)
        c = np.where((r >= 0.4) & (r < 0.6), short_cats[u, rng.integers(0, 2, len(u))], c)
        items = pick(c * cfg.n_styles + rng.integers(0, cfg.n_styles, len(u)))
        p = click_prob(u, items)
        y = (rng.random(len(u)) < p).astype(np.int8)
        perm = rng.permutation(len(u))
        return u[perm], items[perm], p[perm], y[perm]

    tables: dict[str, pa.Table] = {}
    truth = []
    oracle: dict[str, dict[str, float]] = {}
    for split, per_user in (("train", cfg.train_per_user), ("test", cfg.test_per_user)):
        u, items, p, y = samples(per_user)
        onehot = np.stack([1 - y, y], axis=1).astype(np.int8)
        tables[f"{split}_samples"] = pa.table({
            "label_0": pa.array(list(onehot), type=pa.list_(pa.int8())),
            "129_1": user_ids[u], "205": item_ids[items]})
        truth.append(pa.table({"split": [split] * len(u), "129_1": user_ids[u], "205": item_ids[items],
                               "p": p, "label": y}))
        oracle[split] = {"gauc": gauc(user_ids[u], y, p), "auc": auc(y, p), "n": len(u),
                         "click_rate": float(y.mean())}
    profile = rng.integers(0, 20, (n_u, 5))
    for split, hist in (("train", train_hist), ("test", test_hist)):
        tables[f"{split}_user_features"] = pa.table({
            "129_1": user_ids,
            **{f"130_{i + 1}": profile[:, i].astype(np.int64) for i in range(5)},
            "150_2_180": pa.array(list(item_ids[hist]), type=pa.list_(pa.int64())),
            "151_2_180": pa.array(list(cat_ids[cat[hist]]), type=pa.list_(pa.int64())),
        })
    tables["item_features"] = pa.table({"205": item_ids, "206": cat_ids[cat],
                                        "213": rng.integers(0, 50, cfg.n_items), "214": rng.integers(0, 10, cfg.n_items)})
    q = np.trunc(vec[has_vec] * 127).astype(np.int8)
    tables["scl_embedding_int8_p90"] = pa.table({"205": item_ids[has_vec],
                                                 "205_c": pa.array(list(q), type=pa.list_(pa.int8()))})
    for name, table in tables.items():
        pq.write_table(table, out / f"{name}.parquet")
    pq.write_table(pa.concat_tables(truth), out / "truth.parquet")
    # what the last 50 show of the long-term categories (the point of the world)
    recent_long = float(np.mean((cat[recent][:, :, None] == long_cats[:, None, :]).any(axis=2)))
    old_long = float(np.mean((cat[old][:, :, None] == long_cats[:, None, :]).any(axis=2)))
    info = {"config": asdict(cfg), "oracle": oracle, "recent50_long_term_share": recent_long,
            "older_long_term_share": old_long}
    (out / "synth.json").write_text(json.dumps(info, indent=2))
    return info


#: (label, model, esu) trained by ``check``; esu None = the model's default (the paper's set-up)
CHECK_RUNS = [
    ("din (paper: TA + recent SimTier)", "din", None),
    ("din --esu ta", "din", "ta"),
    ("sim-hard (paper: MUSE's ESU)", "sim-hard", None),
    ("sim-hard --esu ta", "sim-hard", "ta"),
    ("sim-soft (paper: MUSE's ESU)", "sim-soft", None),
    ("sim-soft --esu ta", "sim-soft", "ta"),
    ("twin (paper: TA + SimTier)", "twin", None),
    ("twin --esu ta", "twin", "ta"),
    ("muse (sa-ta+simtier)", "muse", None),
]


def check(users: int, seeds: list[int], batch_size: int | None = None, threads: int = 1,
          runs: list[tuple[str, str, str | None]] | None = None) -> list[dict[str, Any]]:
    """Generate, import with the Taobao-MM reader, train every run of ``CHECK_RUNS`` per seed and
    print GAUC against the Bayes oracle."""
    import torch

    from indexer.item_vectors import item_vectors
    from muse import db
    from muse.data.taobao_mm import SCL_SOURCE, import_taobao_mm
    from muse.settings import load_settings
    from ranker.train import RankTrainConfig, model_needs_vectors, train

    torch.set_num_threads(threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(env={}, data_dir=Path(tmp) / "muse-data", device="cpu")
        db.upgrade(settings)
        t0 = time.perf_counter()
        info = generate(Path(tmp) / "raw", SynthConfig(n_users=users, seed=0))
        ds = import_taobao_mm(settings, Path(tmp) / "raw", name="tb-synth")
        oracle = info["oracle"]["test"]["gauc"]
        print(f"generated and imported {users} users, {ds.meta['n_impressions']} impressions in "
              f"{time.perf_counter() - t0:.1f}s; long-term share: older {info['older_long_term_share']:.2f}, "
              f"last 50 {info['recent50_long_term_share']:.2f}; oracle test GAUC {oracle:.4f}", flush=True)
        vectors = item_vectors(settings, SCL_SOURCE, ds)
        for label, model, esu in runs or CHECK_RUNS:
            gaucs, secs = [], []
            for seed in seeds:
                t1 = time.perf_counter()
                res = train(settings, model, "tb-synth", source=SCL_SOURCE, esu=esu,
                            train_config=RankTrainConfig(batch_size=batch_size, seed=seed),
                            vectors=vectors if model_needs_vectors(model, esu) else None)
                gaucs.append(res.metrics["overall"]["gauc"])
                secs.append(time.perf_counter() - t1)
            row = {"label": label, "model": model, "esu": esu, "gauc": gaucs, "mean": float(np.mean(gaucs)),
                   "std": float(np.std(gaucs)), "oracle": oracle, "seconds": float(np.sum(secs))}
            results.append(row)
            print(f"| {label:<34} | {row['mean']:.4f} ± {row['std']:.4f} | {oracle - row['mean']:+.4f} | "
                  f"{' '.join(f'{g:.4f}' for g in gaucs)} | {row['seconds']:.0f}s |", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the raw tables")
    g.add_argument("--out", required=True)
    g.add_argument("--users", type=int, default=500)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train-per-user", type=int, default=SynthConfig.train_per_user,
                   help=f"train samples per user (default {SynthConfig.train_per_user}; 20 gives a 500-user set "
                        "10K training impressions)")
    c = sub.add_parser("check", help="generate, import, train every model, print GAUC vs the oracle")
    c.add_argument("--users", type=int, default=500)
    c.add_argument("--seeds", default="0")
    c.add_argument("--batch-size", type=int, default=None,
                   help="impressions per step (default: the ranker's rule, ranker.schedule)")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--models", default=None, help="comma-separated subset of the models (default all)")
    args = p.parse_args()
    if args.cmd == "generate":
        info = generate(args.out, SynthConfig(n_users=args.users, seed=args.seed,
                                              train_per_user=args.train_per_user))
        print(json.dumps(info["oracle"], indent=2))
        return
    runs = CHECK_RUNS
    if args.models:
        keep = set(args.models.split(","))
        runs = [r for r in CHECK_RUNS if r[1] in keep]
    print("| run | GAUC mean ± std | oracle - GAUC | per seed | wall |\n|---|---|---|---|---|")
    check(args.users, [int(s) for s in args.seeds.split(",")], args.batch_size, args.threads, runs)


if __name__ == "__main__":
    main()
