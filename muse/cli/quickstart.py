"""``muse quickstart``: the whole pipeline on the embedded deployment (no server), in one command.

Stages, each reused when a previous run already did it (``--fresh`` starts over):

1. migrate the metadata database (SQLite under ``MUSE_DATA_DIR``);
2. generate a synthetic world (``--size``: ``standard`` by default, ``tiny`` for tests);
3. train the embedding sources it compares (``--sources``, default ``scl,id``), saying so when an
   encoder collapsed (mean cosine between random items above 0.9);
4. backfill the first source into Milvus Lite through the filesystem queue and an embedded worker;
5. prefetch one user's history into the retriever's cache and show the top behaviours for a target
   the user clicked: titles, categories and cosine scores;
6. train the rankers (``--models`` x sources x ``--seeds``) and print the comparison table (mean GAUC
   and its spread over seeds, one line per model and source), a verdict in words, and the chart's path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

#: The worlds the quickstart can use. ``standard`` is sized so the whole run takes a few minutes on
#: 2 CPUs and the ranker comparison still separates the models; ``tiny`` is what the test runs.
WORLD_OVERRIDES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {}),
    "standard": ("small", {"n_items": 5_000, "n_users": 800, "max_history": 500}),
}
DEFAULT_MODELS = ("din", "sim-hard", "sim-soft", "twin", "muse")
DEFAULT_SOURCES = ("scl", "id")
#: A GAUC within this distance of 0.5 (or within two spreads of it) is reported as chance.
CHANCE_MARGIN = 0.01
#: Fewer test users than this and the comparison is noise; the verdict says so.
MIN_TEST_USERS = 200


def _csv(raw: str) -> list[str]:
    return [x.strip() for x in raw.split(",") if x.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on a synthetic world, embedded (no server): world, sources, backfill, "
             "retrieval, rankers, comparison table",
        description="Runs every stage on the embedded deployment and reuses what an earlier run made "
                    "(a second run takes seconds); --fresh starts over.",
    )
    p.add_argument("--size", default="standard", choices=tuple(WORLD_OVERRIDES),
                   help="world size: standard (5,000 items, 800 users; a few minutes) or tiny (tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world (default 0)")
    p.add_argument("--sources", type=_csv, default=list(DEFAULT_SOURCES),
                   help=f"embedding sources to train and compare, comma-separated (default {','.join(DEFAULT_SOURCES)}); "
                        "the first one is backfilled and used for the retrieval example")
    p.add_argument("--models", type=_csv, default=list(DEFAULT_MODELS),
                   help=f"rankers, comma-separated (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--seeds", type=int, default=3, help="ranker seeds per model and source; the spread is over them (default 3)")
    p.add_argument("--fresh", action="store_true", help="delete what an earlier quickstart made and start over")
    p.set_defaults(func=_quickstart)


class _Stages:
    """Numbered stage headers with their wall time."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.started = total, 0, time.perf_counter()
        self._t: float | None = None

    def begin(self, title: str) -> None:
        self.end()
        self.n += 1
        self._t = time.perf_counter()
        print(f"\n[{self.n}/{self.total}] {title}", flush=True)

    def end(self) -> None:
        if self._t is not None:
            print(f"      ({time.perf_counter() - self._t:.1f} s)", flush=True)
            self._t = None


def _quickstart(args: argparse.Namespace) -> int:
    from indexer.sources import check_source
    from muse.errors import ConfigurationError
    from muse.settings import load_settings
    from ranker.models import model_class

    # Every name is checked before anything runs.
    for s in args.sources:
        check_source(s)
        if s == "scl-taobao":
            raise ConfigurationError("--sources: scl-taobao ships with Taobao-MM; the quickstart's world trains its sources")
    for m in args.models:
        model_class(m)
    if not args.sources:
        raise ConfigurationError("--sources is empty: give at least one, e.g. scl")
    if args.seeds < 1:
        raise ConfigurationError(f"--seeds={args.seeds} must be >= 1")

    settings = load_settings()
    name = f"quickstart-{args.size}-{args.seed}"
    out_dir = settings.path("quickstart", name)
    started = time.perf_counter()
    print(f"muse quickstart: data in {settings.data_dir.absolute()} (embedded: SQLite, Milvus Lite, "
          f"filesystem queue; no server)")
    if args.fresh:
        _forget(settings, name, out_dir)
    stages = _Stages(6)

    stages.begin("metadata database")
    from muse import db

    if db.current_revision(settings) != db.head_revision(settings):
        db.upgrade(settings)
    print(f"      at revision {db.current_revision(settings)} ({settings.database_url})")

    stages.begin(f"synthetic world {name}")
    world = _world(settings, name, args.size, args.seed)

    stages.begin(f"embedding sources: {', '.join(args.sources)}")
    spreads = {s: _source(settings, s, name) for s in args.sources}

    main_source = args.sources[0]
    stages.begin(f"backfill {main_source} into Milvus through the queue and the embedded worker")
    _backfill(main_source, name)

    stages.begin(f"retrieval example ({main_source}, GSU on the prefetched device cache)")
    _retrieval_example(settings, name, main_source, world)

    stages.begin(f"rankers: {', '.join(args.models)} x {args.seeds} seed(s)")
    rows = _rankers(settings, name, args.models, args.sources, args.seeds)
    stages.end()

    print()
    table = _table(rows, spreads)
    print(table)
    verdict = _verdict(rows, spreads, world)
    for line in verdict:
        print(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = _chart(rows, spreads, out_dir / "compare.png", name)
    (out_dir / "compare.md").write_text(f"# {name}: GAUC over {args.seeds} seed(s)\n\n{table}\n" + "\n".join(verdict) + "\n")
    (out_dir / "compare.json").write_text(json.dumps({"dataset": name, "rows": rows, "sources": spreads,
                                                       "verdict": verdict}, indent=2, default=str))
    print(f"\nchart: {chart}\ntable: {out_dir / 'compare.md'}")
    print(f"quickstart finished in {time.perf_counter() - started:.0f} s "
          "(see `muse rank list`, `muse backfill list`, `muse embed list`; a second run reuses all of it)")
    return 0


# --- stages -----------------------------------------------------------------------------------


def _forget(settings: Any, name: str, out_dir: Path) -> None:
    """--fresh: drop the world, its source versions, backfills, ranker runs and outputs."""
    from sqlalchemy import inspect, select

    from muse import db, models

    if inspect(db.get_engine(settings)).has_table("datasets"):
        with db.session_scope(settings) as session:
            ds = session.scalars(select(models.Dataset).where(models.Dataset.name == name)).one_or_none()
            if ds is not None:
                for model in (models.RankerRun, models.BackfillJob, models.EmbeddingSource):
                    for row in session.scalars(select(model).where(model.dataset_id == ds.id)):
                        if isinstance(row, models.BackfillJob):
                            for chunk in list(getattr(row, "chunks", []) or []):
                                session.delete(chunk)
                        session.delete(row)
                session.flush()
                session.delete(ds)
    shutil.rmtree(settings.path("datasets", name), ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"--fresh: removed {name} and everything made from it")


def _world(settings: Any, name: str, size: str, seed: int) -> Any:
    from muse.data.format import Dataset
    from muse.data.simworld import generate_simworld
    from muse.data.simworld_config import world_config

    base, overrides = WORLD_OVERRIDES[size]
    config = world_config(base, **overrides)
    if settings.path("datasets", name, "meta.json").exists():
        ds = Dataset.open(settings, name)
        print(f"      reusing {name}: {ds.n_items:,} items, {ds.n_users:,} users")
    else:
        ds = generate_simworld(settings, base, seed, name, config=config, progress=True)
        print(f"      generated {name}: {ds.n_items:,} items, {ds.n_users:,} users")
    return _World(ds, config)


@dataclasses.dataclass
class _World:
    dataset: Any
    config: Any

    def category_name(self, category: int) -> str:
        """simworld category id (leaf + 1) -> 'top/leaf'."""
        from muse.data.simworld_vocab import TOP_CATEGORIES

        top, sub = divmod(int(category) - 1, self.config.leaves_per_top)
        try:
            return f"{TOP_CATEGORIES[top][0]}/{TOP_CATEGORIES[top][1][sub][0]}"
        except IndexError:
            return str(category)


def _source(settings: Any, source: str, dataset: str) -> dict[str, Any]:
    """The latest version of ``source`` trained on ``dataset`` (training one when there is none)."""
    from indexer.evaluation import collapse_note
    from indexer.sources import dataset_row_id, list_versions
    from indexer.training import train_source

    ds_id = dataset_row_id(settings, dataset)
    done = [v for v in list_versions(settings, source) if v.dataset_id == ds_id and ds_id is not None]
    if done:
        row, how = done[-1], "reusing"
    else:
        row, how = train_source(settings, source, dataset, progress=True).source, "trained"
    train = row.metrics.get("train", {})
    cos = train.get("mean_cosine")
    print(f"      {how} {source} v{row.version}: {train.get('steps')} steps on {train.get('n_pairs')} pairs in "
          f"{train.get('seconds')} s; mean cosine between random items "
          f"{'-' if cos is None else format(cos, '.2f')}")
    note = collapse_note(cos)
    if note:
        print(f"      warning: {source}: {note}; its rankers are not results")
    return {"version": row.version, "mean_cosine": cos, "collapsed": note is not None,
            "seconds": train.get("seconds"), "steps": train.get("steps")}


def _backfill(source: str, dataset: str) -> None:
    from muse.cli.main import main
    from muse.errors import BackendUnavailable

    code = main(["backfill", "--source", source, "--dataset", dataset])
    if code:
        raise BackendUnavailable(f"the backfill of {source} on {dataset} did not finish (exit {code}); "
                                 "`muse backfill list` shows the job, `muse backfill resume JOB` continues it")


def _retrieval_example(settings: Any, dataset: str, source: str, world: _World, k: int = 8) -> None:
    """Prefetch one test user's history and print the top-``k`` behaviours for a clicked target."""
    import numpy as np

    from retriever.client import Retriever

    ds = world.dataset
    user, target = _example_user(ds)
    items = ds.items()
    ids = items.column("item_id").to_numpy()
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    titles, cats = items.column("title").to_pylist(), items.column("category").to_pylist()

    def describe(item: int) -> str:
        r = row_of.get(int(item))
        return "?" if r is None else f"{world.category_name(cats[r]):<16} {titles[r]}"

    with Retriever.from_settings(source=source, settings=settings) as r:
        lengths = r.prefetch([user]).result(timeout=120)
        full = r.search(user, [target], k=min(1000, max(k, lengths.get(user, k) or k)))
    hits = full[0]
    if not len(hits):
        print(f"      user {user} has no behaviours in {source}; the backfill did not write them")
        return
    scores = hits.scores.astype(np.float64)
    behaviour_items = hits.behaviour_item_ids.astype(np.int64)
    print(f"      user {user}: {lengths.get(user, len(hits))} behaviours prefetched; target item {target} "
          f"(clicked in the test split): {describe(target)}")
    print("      top behaviours, one line per distinct item (x N: times in the history):")
    print(f"      {'rank':>4} {'cosine':>7}  {'item':>6}  {'times':>5}  {'category':<16} title")
    shown: list[int] = []
    for rank in range(len(hits)):
        item = int(behaviour_items[rank])
        if item in shown:
            continue
        shown.append(item)
        times = int((behaviour_items == item).sum())
        mark = "  <- the target itself" if item == target else ""
        print(f"      {len(shown):>4} {scores[rank]:>7.4f}  {item:>6}  {'x' + str(times):>5}  {describe(item)}{mark}")
        if len(shown) >= k:
            break
    print(f"      cosines over the whole history: max {scores.max():.3f}, median {np.median(scores):.3f}, "
          f"min {scores.min():.3f}, std {scores.std():.3f}")
    if scores.std() < 0.01 or np.median(scores) > 0.99:
        print(f"      warning: every behaviour scores alike ({source} collapsed): this example carries no signal")


def _example_user(ds: Any) -> tuple[int, int]:
    """A test-split (user, clicked item) with the longest history among the first batch of clicks."""
    import numpy as np

    best: tuple[int, int, int] | None = None
    for batch in ds.iter_impressions(split="test", batch_size=4096):
        label = batch.column("label").to_numpy()
        users = batch.column("user_id").to_numpy()
        items = batch.column("item_id").to_numpy()
        lens = batch.column("hist_len").to_numpy() if "hist_len" in batch.schema.names else np.zeros(len(users))
        for i in np.flatnonzero(label > 0)[:2000]:
            cand = (int(lens[i]), int(users[i]), int(items[i]))
            if best is None or cand[0] > best[0]:
                best = cand
        if best is not None:
            break
    if best is None:
        first = next(ds.iter_impressions(split="test", batch_size=8))
        return int(first.column("user_id")[0].as_py()), int(first.column("item_id")[0].as_py())
    return best[1], best[2]


def _rankers(settings: Any, dataset: str, models: list[str], sources: list[str], seeds: int) -> list[dict[str, Any]]:
    """Train (or reuse) every model x source x seed; one row per model and source with the mean and spread."""
    import numpy as np

    from ranker.models import model_class
    from ranker.runs import list_runs
    from ranker.train import TrainConfig, train

    runs = [r for r in list_runs(settings) if r.dataset == dataset and r.status == "done"]
    rows = []
    for model in models:
        per = sources if model_class(model).needs_vectors else [None]
        for source in per:
            gaucs, aucs, long_hist, run_ids = [], [], [], []
            for seed in range(seeds):
                cfg = TrainConfig(seed=seed)
                old = [r for r in runs if (r.model, r.source, r.seed) == (model, source, seed)
                       and (r.config.get("train") or {}) == dataclasses.asdict(cfg)]
                if old:
                    metrics, run_id, how = old[-1].metrics, old[-1].id, "reused"
                else:
                    res = train(settings, model, dataset, source=source, train_config=cfg)
                    metrics, run_id, how = res.metrics, res.run_id, f"{res.metrics['train']['seconds']:.0f} s"
                overall = metrics["overall"]
                gaucs.append(overall["gauc"])
                aucs.append(overall["auc"])
                long_hist.append((metrics.get("long_history") or {}).get("gauc", float("nan")))
                run_ids.append(run_id)
                print(f"      {model:<9} {source or '-':<9} seed {seed}: GAUC {overall['gauc']:.4f}  "
                      f"(run {run_id}, {how})", flush=True)
            rows.append({
                "model": model, "source": source, "seeds": seeds, "runs": run_ids,
                "gauc": float(np.mean(gaucs)), "gauc_std": float(np.std(gaucs, ddof=1)) if seeds > 1 else None,
                "gauc_min": float(min(gaucs)), "gauc_max": float(max(gaucs)),
                "auc": float(np.mean(aucs)), "gauc_long_history": float(np.nanmean(long_hist)),
                "n_test": int(overall["n"]),
            })
    return rows


# --- the result -------------------------------------------------------------------------------


def _at_chance(row: dict[str, Any]) -> bool:
    spread = row["gauc_std"] or 0.0
    return row["gauc"] - 0.5 < max(CHANCE_MARGIN, 2 * spread)


def _status(row: dict[str, Any], spreads: dict[str, Any]) -> str:
    if row["source"] and spreads.get(row["source"], {}).get("collapsed"):
        return f"not a result: the {row['source']} encoder collapsed"
    if _at_chance(row):
        return "at chance (not a result)"
    return ""


def _table(rows: list[dict[str, Any]], spreads: dict[str, Any]) -> str:
    seeds = rows[0]["seeds"] if rows else 0
    spread_head = "GAUC +- std" if seeds > 1 else "GAUC"
    lines = [f"{'model':<10} {'source':<7} {spread_head:>16} {'min..max':>15} {'AUC':>7} {'GAUC long-hist':>15}  note",
             "-" * 84]
    for r in rows:
        g = f"{r['gauc']:.4f}" + (f" +- {r['gauc_std']:.4f}" if r["gauc_std"] is not None else "")
        lines.append(f"{r['model']:<10} {r['source'] or '-':<7} {g:>16} {r['gauc_min']:.4f}..{r['gauc_max']:.4f} "
                     f"{r['auc']:>7.4f} {r['gauc_long_history']:>15.4f}  {_status(r, spreads)}")
    lines.append(f"GAUC on {rows[0]['n_test'] if rows else 0:,} test impressions; mean over {seeds} seed(s)"
                 + (", +- = standard deviation over the seeds" if seeds > 1 else ""))
    return "\n".join(lines)


def _verdict(rows: list[dict[str, Any]], spreads: dict[str, Any], world: _World) -> list[str]:
    """What the table says, in words: the best model, MUSE against DIN, and what is not a result."""
    out = []
    test_users = _n_test_users(world.dataset)
    if test_users < MIN_TEST_USERS:
        out.append(f"note: only {test_users} test users; differences between models here are noise "
                   "(the standard size is the one to read)")
    valid = [r for r in rows if not _status(r, spreads)]
    for r in rows:
        if _status(r, spreads):
            label = r["model"] + (f" ({r['source']})" if r["source"] else "")
            out.append(f"{label}: {_status(r, spreads)}")
    if valid:
        best = max(valid, key=lambda r: r["gauc"])
        out.append(f"best: {best['model']}" + (f" ({best['source']})" if best["source"] else "")
                   + f", GAUC {best['gauc']:.4f}")
    din = next((r for r in rows if r["model"] == "din"), None)
    for r in rows:
        if r["model"] != "muse" or din is None:
            continue
        gap = r["gauc"] - din["gauc"]
        noise = 2 * max(r["gauc_std"] or 0.0, din["gauc_std"] or 0.0)
        if _status(r, spreads):
            continue
        if gap > noise and noise > 0:
            word = "above"
        elif gap > 0:
            word = "above, within the seed spread," if noise > 0 else "above (one seed: no spread)"
        else:
            word = "NOT above"
        out.append(f"muse ({r['source']}) is {word} DIN: {gap:+.4f} GAUC")
    return out


def _n_test_users(ds: Any) -> int:
    import numpy as np

    users = [b.column("user_id").to_numpy() for b in ds.iter_impressions(split="test", batch_size=65536)]
    return int(len(np.unique(np.concatenate(users)))) if users else 0


def _chart(rows: list[dict[str, Any]], spreads: dict[str, Any], path: Path, title: str) -> Path:
    """GAUC per model and source as bars from chance (0.5), with the seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["model"] + (f" / {r['source']}" if r["source"] else "") for r in rows]
    values = [r["gauc"] for r in rows]
    errors = [r["gauc_std"] or 0.0 for r in rows]
    colours = ["tab:gray" if _status(r, spreads) else ("tab:orange" if r["source"] else "tab:blue") for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    ax.barh(labels, [v - 0.5 for v in values], left=0.5, xerr=errors, color=colours, capsize=3)
    ax.axvline(0.5, color="black", linewidth=1)
    ax.set_xlim(0.45, max(0.75, max(values, default=0.5) + 0.05))
    ax.set_xlabel("GAUC (test), bars from chance = 0.5; error bars: std over seeds; grey: not a result")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
