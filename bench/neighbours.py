"""What each embedding source's nearest neighbours share, measured against the simworld ground truth.

Two measurements per source (the latest trained version of each, from ``$MUSE_DATA_DIR``):

1. **Item neighbours**: for a sample of items (uniform over the catalogue, and weighted as the test
   impressions are), the share of each item's top-``k`` cosine neighbours (all items, itself
   excluded) that share each latent attribute of the generator: top category, leaf, colour, shape,
   pattern, style, brand and the interest key (leaf x colour) that the click model rewards. A
   ``chance`` row gives the share for random pairs.
2. **What the GSU retrieves**: for test impressions whose click model matched a lifelong facet that
   is in the user's visible history, the user's history before the impression (newest
   ``--max-history``) is ranked by cosine to the candidate, as MUSE's GSU does; printed: the share
   of the top ``--gsu-k`` on the candidate's interest key (precision), the share of the history's
   key items it finds (recall, of at most ``gsu-k``), the same for the leaf and the colour, and a
   ``recent`` row (the newest ``gsu-k`` behaviours) and a ``truth`` row (the key items first: the
   best any GSU can do), and the SimTier tier gap: the mean tier (``ceil(cos * 10)``, the ranker's
   0.1-wide bins) of the retrieved items on the key minus that of the other retrieved items.
3. **How much the similarities alone rank a user's candidates**: for every test impression of up to
   ``--n-users`` test users (with a click and a non-click), a score from the candidate's cosines to
   the history only (the mean of its top-10 cosines, as SimTier's upper tiers see them); printed:
   the GAUC of that score against the clicks, the GAUC with the true click probability as the
   score (the ceiling), and the mean top-10 cosine of key / leaf-only / colour-only / unrelated
   candidates (how well the similarity separates what the click model rewards from what it does not).

    MUSE_DATA_DIR=... python -m bench.neighbours --dataset simworld-small-0
    python -m bench.neighbours --dataset simworld-small-0 --sources scl,id --json out.json
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

ATTRS = ("top", "leaf", "colour", "shape", "pattern", "style", "brand", "key")
SOURCES = ("id", "openclip", "i2i", "scl")


def _neighbour_shares(vec: np.ndarray, attrs: dict[str, np.ndarray], rows: np.ndarray, k: int) -> dict[str, float]:
    """Mean share of the top-``k`` cosine neighbours of ``rows`` sharing each attribute."""
    out = {a: 0.0 for a in ATTRS}
    for start in range(0, len(rows), 256):
        sel = rows[start : start + 256]
        sims = vec[sel] @ vec.T  # [b, n]
        sims[np.arange(len(sel)), sel] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]  # [b, k]
        for a in ATTRS:
            out[a] += float((attrs[a][top] == attrs[a][sel][:, None]).mean(axis=1).sum())
    return {a: v / len(rows) for a, v in out.items()}


def _gsu_stats(score: np.ndarray, hist_attr: dict[str, np.ndarray], cand: dict[str, int], gsu_k: int) -> dict[str, tuple[float, float]]:
    """(precision, recall) of the top ``gsu_k`` by ``score`` for key, leaf and colour."""
    top = np.argsort(-score, kind="stable")[:gsu_k]
    res = {}
    for a in ("key", "leaf", "colour"):
        same = hist_attr[a] == cand[a]
        n_same = int(same.sum())
        hit = int(same[top].sum())
        res[a] = (hit / len(top), hit / max(1, min(gsu_k, n_same)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="simworld-small-0")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--k", type=int, default=10, help="item neighbours (default 10)")
    ap.add_argument("--n-items", type=int, default=1000, help="items sampled per measurement (default 1000)")
    ap.add_argument("--n-impressions", type=int, default=1000, help="test impressions for the GSU part")
    ap.add_argument("--gsu-k", type=int, default=50)
    ap.add_argument("--max-history", type=int, default=1000)
    ap.add_argument("--n-users", type=int, default=400, help="test users for the similarity-GAUC part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    os.environ.setdefault("MUSE_DEVICE", "cpu")

    import pyarrow.parquet as pq

    from indexer.item_vectors import item_vectors
    from muse.arrays import lookup
    from muse.data.format import Dataset
    from muse.settings import load_settings
    from ranker.metrics import gauc as grouped_auc

    settings = load_settings()
    ds = Dataset.open(settings, args.dataset)
    truth = pq.read_table(ds.truth_path("items")).to_pandas().sort_values("item_id")
    item_ids = truth["item_id"].to_numpy()
    attrs = {a: truth[a].to_numpy() for a in ATTRS}
    pos = {int(i): r for r, i in enumerate(item_ids.tolist())}
    rng = np.random.default_rng(args.seed)
    n = len(item_ids)

    imps = pq.read_table(ds.path / "impressions").to_pandas()
    timp = pq.read_table(ds.truth_path("impressions")).to_pandas()
    test = imps["split"].to_numpy() == "test"
    test_items = np.array([pos[int(i)] for i in imps.loc[test, "item_id"].tolist()])
    samples = {
        "uniform": rng.choice(n, size=min(args.n_items, n), replace=False),
        "impression-weighted": rng.choice(test_items, size=args.n_items, replace=True),
    }

    # impressions for the GSU part: clicks explained by a lifelong facet whose key is in the history
    sel = np.flatnonzero(test & (timp["explained_by"].to_numpy() == "lifelong") & timp["key_in_history"].to_numpy())
    sel = rng.choice(sel, size=min(args.n_impressions, len(sel)), replace=False)
    hist = ds.histories_table().to_pandas()
    user_hist = {int(u): np.asarray(h, np.int64) for u, h in zip(hist["user_id"], hist["item_ids"])}
    cases = []
    for r in sel.tolist():
        h = user_hist[int(imps["user_id"].iat[r])][: int(imps["hist_len"].iat[r])][-args.max_history :]
        rows = np.array([pos[int(i)] for i in h.tolist()], np.int64)
        cases.append((pos[int(imps["item_id"].iat[r])], rows))

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    result: dict = {"dataset": args.dataset, "k": args.k, "gsu_k": args.gsu_k, "neighbours": {}, "gsu": {}}
    chance = {a: float((attrs[a][rng.integers(0, n, 20000)] == attrs[a][rng.integers(0, n, 20000)]).mean()) for a in ATTRS}
    vectors = {}
    for s in sources:
        table = item_vectors(settings, s, ds)
        v = table.vectors[lookup(table.item_ids, item_ids)].astype(np.float32)  # [n, d], in item_ids' order
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # float32, as docs/ranker.md measured
        vectors[s] = v

    for name, rows in samples.items():
        print(f"\n## top-{args.k} item neighbours sharing each attribute ({name} sample of {len(rows)} items)\n")
        print("| source | " + " | ".join(ATTRS) + " |")
        print("|---" * (len(ATTRS) + 1) + "|")
        res = {"chance": chance}
        for s in sources:
            res[s] = _neighbour_shares(vectors[s], attrs, rows, args.k)
        for s, d in res.items():
            print(f"| {s} | " + " | ".join(f"{d[a]:.3f}" for a in ATTRS) + " |", flush=True)
        result["neighbours"][name] = res

    print(f"\n## GSU top-{args.gsu_k} of the history (newest {args.max_history}) for {len(cases)} test impressions "
          "explained by a lifelong facet in the history\n")
    print("| GSU | key precision | key recall | leaf precision | leaf recall | colour precision | colour recall "
          "| SimTier tier gap key - other |")
    print("|---|---|---|---|---|---|---|---|")
    gsus = ["recent", "truth"] + sources
    for g in gsus:
        acc = {a: np.zeros(2) for a in ("key", "leaf", "colour")}
        gaps = []  # mean SimTier tier (ceil(cos * 10)) of the top-k items on the key minus the others'
        for cand, rows in cases:
            ha = {a: attrs[a][rows] for a in ("key", "leaf", "colour")}
            ca = {a: int(attrs[a][cand]) for a in ("key", "leaf", "colour")}
            if g == "recent":
                score = np.arange(len(rows), dtype=np.float64)
            elif g == "truth":
                score = (ha["key"] == ca["key"]) * 2.0 + (ha["leaf"] == ca["leaf"]) + np.arange(len(rows)) / 1e6
            else:
                score = vectors[g][rows] @ vectors[g][cand]
                top = np.argsort(-score, kind="stable")[: args.gsu_k]
                on_key = ha["key"][top] == ca["key"]
                if on_key.any() and not on_key.all():
                    tiers = np.ceil(np.clip(score[top], -1, 1) * 10)
                    gaps.append(float(tiers[on_key].mean() - tiers[~on_key].mean()))
            for a, (pr, rc) in _gsu_stats(score, ha, ca, args.gsu_k).items():
                acc[a] += (pr, rc)
        d = {a: (acc[a] / len(cases)).tolist() for a in acc}
        d["tier_gap"] = float(np.mean(gaps)) if gaps else None
        result["gsu"][g] = d
        gap = "-" if d["tier_gap"] is None else f"{d['tier_gap']:.2f}"
        print(f"| {g} | " + " | ".join(f"{d[a][0]:.3f} | {d[a][1]:.3f}" for a in ("key", "leaf", "colour"))
              + f" | {gap} |", flush=True)
    # 3. the similarities as a ranking score of each user's test candidates
    test_rows = np.flatnonzero(test)
    users = imps["user_id"].to_numpy()[test_rows]
    labels = imps["label"].to_numpy()[test_rows]
    per_user: dict[int, list[int]] = {}
    for r, u in zip(test_rows.tolist(), users.tolist()):
        per_user.setdefault(int(u), []).append(r)
    eligible = [u for u, rs in per_user.items() if 0 < imps["label"].to_numpy()[rs].sum() < len(rs)]
    chosen = rng.choice(np.array(eligible), size=min(args.n_users, len(eligible)), replace=False).tolist()
    del users, labels
    lab_all = imps["label"].to_numpy()
    p_all = timp["p_click"].to_numpy()
    print(f"\n## The candidate's top-10 cosines to the history as a score: GAUC over {len(chosen)} test users\n")
    print("| score | GAUC (clicks) | mean top-10 cos: key match | leaf only | colour only | unrelated |")
    print("|---|---|---|---|---|---|")
    result["sim_gauc"] = {}

    def gauc(scores: dict[int, np.ndarray]) -> float:  # the ranker's GAUC over the chosen users
        return grouped_auc(np.concatenate([np.full(len(per_user[u]), u) for u in chosen]),
                           np.concatenate([lab_all[per_user[u]] for u in chosen]),
                           np.concatenate([scores[u] for u in chosen]))

    print(f"| p_click (ceiling) | {gauc({u: p_all[per_user[u]] for u in chosen}):.4f} | | | | |")
    for s in sources:
        v = vectors[s]
        scores, kinds = {}, {"key": [], "leaf": [], "colour": [], "none": []}
        for u in chosen:
            out = []
            for r in per_user[u]:
                h = user_hist[u][: int(imps["hist_len"].iat[r])][-args.max_history :]
                c = pos[int(imps["item_id"].iat[r])]
                if len(h) == 0:
                    out.append(0.0)
                    continue
                rows = np.array([pos[int(i)] for i in h.tolist()], np.int64)
                cos = v[rows] @ v[c]
                val = float(np.sort(cos)[-10:].mean())
                out.append(val)
                hk, hl, hc = attrs["key"][rows], attrs["leaf"][rows], attrs["colour"][rows]
                kind = ("key" if (hk == attrs["key"][c]).any() else "leaf" if (hl == attrs["leaf"][c]).any()
                        else "colour" if (hc == attrs["colour"][c]).any() else "none")
                kinds[kind].append(val)
            scores[u] = np.array(out)
        g = gauc(scores)
        means = {k: float(np.mean(x)) if x else float("nan") for k, x in kinds.items()}
        result["sim_gauc"][s] = {"gauc": g, **means}
        print(f"| {s} | {g:.4f} | " + " | ".join(f"{means[k]:.3f}" for k in ("key", "leaf", "colour", "none")) + " |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
