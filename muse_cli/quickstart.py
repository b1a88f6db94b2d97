"""``muse quickstart``: the whole pipeline on the embedded deployment (no server), in one command.

Stages, each reused when a previous run already did it (``--fresh`` starts over):

1. migrate the metadata database (SQLite under ``MUSE_DATA_DIR``);
2. generate a synthetic world (``--size``: ``standard`` by default, ``tiny`` for tests);
3. train the embedding sources it compares (``--sources``, default ``scl,id``), saying so when an
   encoder collapsed (mean cosine between random items above 0.9);
4. backfill the first source into Milvus Lite through the filesystem queue and an embedded worker;
5. prefetch one user's history into the retriever's cache and show the top behaviours for a target
   the user clicked: titles, categories and cosine scores;
6. train the rankers (every ``--models`` on the first source, din and muse on the others, ``--seeds``
   seeds each, through ``ranker.compare``) and print the comparison table (mean GAUC and its spread
   over seeds, one line per model and source), a verdict in words, and the chart's path.
"""

from __future__ import annotations

import argparse
import dataclasses
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
DEFAULT_SOURCES = ("scl", "id")  # the models default to every registered one (ranker.models.list_models)
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
    p.add_argument("--models", type=_csv, default=None,
                   help="rankers, comma-separated (default: every model of `muse rank train --model`)")
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
    from muse.errors import ConfigurationError
    from muse.settings import load_settings
    from muse_cli.registries import model_names, trainable_sources

    # Every name is checked against the registries before anything runs.
    trainable, models = trainable_sources(), model_names()
    if args.models is None:
        args.models = list(models)
    for s in args.sources:
        if s not in trainable:
            raise ConfigurationError(f"--sources: embedding source {s!r} is unknown to the quickstart; "
                                     f"valid: {', '.join(trainable)}")
    for m in args.models:
        if m not in models:
            raise ConfigurationError(f"--models: model {m!r} is unknown; valid: {', '.join(models)}")
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

    if db.database_missing(settings) or db.current_revision(settings) != db.head_revision(settings):
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
    _retrieval_example(settings, name, main_source, world, spreads[main_source]["version"])

    stages.begin(f"rankers: {', '.join(args.models)} x {args.seeds} seed(s)")
    res = _rankers(settings, name, args.models, args.sources, args.seeds)
    rows = _rows(res.result)
    stages.end()

    print()
    table = _table(rows, spreads, _n_test(world.dataset))
    print(table)
    from ranker.compare import intrinsic_lines, write_comparison

    for line in intrinsic_lines(res.result.get("intrinsic") or {}):
        print(line)
    verdict = _verdict(rows, spreads, world)
    for line in verdict:
        print(line)

    table_path, json_path, chart = write_comparison(res.result, out_dir, extra=verdict)
    how = "stored before: a repeated quickstart reuses it" if res.stored_before else "stored"
    print(f"\ncomparison {res.comparison_id} ({how}; `muse compare --show {res.comparison_id}` prints it again)")
    print(f"chart: {chart}\ntable: {table_path}\njson:  {json_path}")
    print(f"quickstart finished in {time.perf_counter() - started:.0f} s "
          "(see `muse rank list`, `muse backfill list`, `muse embed list`; a second run reuses all of it)")
    return 0


# --- stages -----------------------------------------------------------------------------------


def _forget(settings: Any, name: str, out_dir: Path) -> None:
    """--fresh: drop the world, its source versions, backfills, ranker runs and outputs."""
    from sqlalchemy import inspect, select

    from muse import db, models

    if not db.database_missing(settings) and inspect(db.get_engine(settings)).has_table("datasets"):
        with db.session_scope(settings) as session:
            ds = session.scalars(select(models.Dataset).where(models.Dataset.name == name)).one_or_none()
            if ds is not None:
                # Source versions stay (detached from the dataset): version numbers name Milvus
                # collections, so a fresh world trains the next version instead of reusing a number.
                for model in (models.Comparison, models.RankerRun, models.BackfillJob):
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
        from muse.data.simworld_vocab import category_label

        return category_label(category, self.config.leaves_per_top)


def _source(settings: Any, source: str, dataset: str) -> dict[str, Any]:
    """The latest version of ``source`` trained on ``dataset`` (training one when there is none)."""
    from indexer.evaluation import collapse_note
    from indexer.source_registry import dataset_row_id, list_versions
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
    from muse.errors import BackendUnavailable
    from muse_cli.main import main

    code = main(["backfill", "--source", source, "--dataset", dataset])
    if code:
        raise BackendUnavailable(f"the backfill of {source} on {dataset} did not finish (exit {code}); "
                                 "`muse backfill list` shows the job, `muse backfill resume JOB` continues it")


#: The retrieval example's target shows at least this many distinct items in its top 5 (a target the
#: user bought over and over would show itself five times at cosine 1.0: nothing to see).
DISTINCT_TOP5 = 4
#: How many clicked (user, target) pairs the example tries, longest histories first.
EXAMPLE_CANDIDATES = 40


def _retrieval_example(settings: Any, dataset: str, source: str, world: _World, version: int | None = None,
                       k: int = 8) -> tuple[int, int] | None:
    """Prefetch test users' histories, pick a clicked target whose top 5 behaviours are varied
    (:data:`DISTINCT_TOP5`), print its top-``k`` behaviours and the README snippet's first line for
    it; returns the (user, target) shown."""
    import numpy as np

    from retriever.client import Retriever

    ds = world.dataset
    candidates = _example_candidates(ds)
    items = ds.items()
    ids = items.column("item_id").to_numpy()
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    titles, cats = items.column("title").to_pylist(), items.column("category").to_pylist()

    def describe(item: int) -> str:
        r = row_of.get(int(item))
        return "?" if r is None else f"{world.category_name(cats[r]):<16} {titles[r]}"

    with Retriever.from_settings(source=source, settings=settings, dataset=dataset, version=version) as r:
        lengths = r.prefetch(sorted({u for u, _ in candidates})).result(timeout=120)
        chosen = None
        for user, target in candidates:
            full = r.search(user, [target], k=min(1000, max(k, lengths.get(user, k) or k)))
            top5 = full[0].behaviour_item_ids[:5].tolist()
            if chosen is None or len(set(top5)) >= DISTINCT_TOP5:
                chosen = (user, target, full)
            if len(set(top5)) >= DISTINCT_TOP5:
                break
    if chosen is None:
        print("      no test impressions to show")
        return None
    user, target, full = chosen
    hits = full[0]
    if not len(hits):
        print(f"      user {user} has no behaviours in {source}; the backfill did not write them")
        return None
    scores = hits.scores.astype(np.float64)
    behaviour_items = hits.behaviour_item_ids.astype(np.int64)
    print(f"      {source} v{full.version}; user {user}: {lengths.get(user, len(hits))} behaviours prefetched; "
          f"target item {target} (clicked in the test split): {describe(target)}")
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
    print(f'      the README\'s Python snippet for this example: dataset, user, targets = "{dataset}", {user}, [{target}]')
    return user, target


def _example_candidates(ds: Any, n: int = EXAMPLE_CANDIDATES) -> list[tuple[int, int]]:
    """Up to ``n`` test-split (user, clicked item) pairs, longest histories first, one per user, from
    the first batch of clicks (the first test impression when there is no click)."""
    import numpy as np

    found: dict[int, tuple[int, int]] = {}  # user -> (history length, item)
    for batch in ds.iter_impressions(split="test", batch_size=4096):
        label = batch.column("label").to_numpy()
        users = batch.column("user_id").to_numpy()
        items = batch.column("item_id").to_numpy()
        lens = batch.column("hist_len").to_numpy() if "hist_len" in batch.schema.names else np.zeros(len(users))
        for i in np.flatnonzero(label > 0)[:2000]:
            u = int(users[i])
            if u not in found or int(lens[i]) > found[u][0]:
                found[u] = (int(lens[i]), int(items[i]))
        if found:
            break
    if not found:
        first = next(ds.iter_impressions(split="test", batch_size=8), None)
        if first is None:
            return []
        return [(int(first.column("user_id")[0].as_py()), int(first.column("item_id")[0].as_py()))]
    ranked = sorted(found.items(), key=lambda kv: (-kv[1][0], kv[0]))[:n]
    return [(u, item) for u, (_, item) in ranked]


def _rankers(settings: Any, dataset: str, models: list[str], sources: list[str], seeds: int) -> Any:
    """Every model on the first source, din and muse on the others, ``seeds`` seeds each, as one
    comparison (:func:`ranker.compare.compare`, which reuses matching recorded runs and, when every
    run is reused, the stored comparison itself)."""
    import functools

    from indexer.item_vectors import item_vectors
    from muse_cli.rank import record_started_run
    from ranker.compare import compare

    def show(row: Any) -> None:
        if not row.reused:
            record_started_run(settings, row.run_id, "muse quickstart")
        how = "reused" if row.reused else f"{row.metrics['train']['seconds']:.0f} s"
        under = f"  {row.undertrained}" if row.undertrained else ""
        print(f"      {row.model:<9} {row.source or '-':<9} seed {row.seed}: GAUC {row.metrics['overall']['gauc']:.4f}  "
              f"(run {row.run_id}, {how}){under}", flush=True)

    groups = [(models, sources[:1])]
    pair = [m for m in ("din", "muse") if m in models]  # MUSE against DIN on every source
    if pair and len(sources) > 1:
        groups.append((pair, sources[1:]))
    return compare(settings, dataset, groups=groups, seeds=list(range(seeds)), on_row=show, write_files=False,
                   vectors_for=functools.partial(item_vectors, settings))


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per cell (model and source) of the comparison, for the table and the verdict."""
    rows = []
    for cell in result["cells"]:
        m = cell["metrics"]
        rows.append({
            "model": cell["model"], "esu": cell["esu"], "source": cell["source"], "seeds": len(cell["seeds"]),
            "runs": cell["runs"], "comparison": result["id"], "undertrained": cell.get("undertrained") or [],
            "gauc": m["gauc"]["mean"], "gauc_std": m["gauc"]["std"] if len(cell["seeds"]) > 1 else None,
            "gauc_min": min(v for v in m["gauc"]["values"] if v is not None),
            "gauc_max": max(v for v in m["gauc"]["values"] if v is not None),
            "auc": m["auc"]["mean"], "gauc_long_history": m["gauc_long_history"]["mean"],
        })
    return rows


# --- the result -------------------------------------------------------------------------------


def _at_chance(row: dict[str, Any]) -> bool:
    from ranker.compare import verdict

    return verdict({"mean": row["gauc"], "std": row["gauc_std"]}) == "at chance"


def _status(row: dict[str, Any], spreads: dict[str, Any]) -> str:
    if row["source"] and spreads.get(row["source"], {}).get("collapsed"):
        return f"not a result: the {row['source']} encoder collapsed"
    if row.get("undertrained"):
        return f"undertrained (not a result): {len(row['undertrained'])} of {len(row['runs'])} runs"
    if _at_chance(row):
        return "at chance (not a result)"
    return ""


def _label(row: dict[str, Any]) -> str:
    return f"{row['model']} ({row['esu']})"


def _table(rows: list[dict[str, Any]], spreads: dict[str, Any], n_test: int) -> str:
    seeds = rows[0]["seeds"] if rows else 0
    spread_head = "GAUC +- std" if seeds > 1 else "GAUC"
    lines = [f"{'model (ESU)':<24} {'source':<7} {spread_head:>16} {'min..max':>15} {'AUC':>7} {'long-hist':>9}  note",
             "-" * 92]
    for r in rows:
        g = f"{r['gauc']:.4f}" + (f" +- {r['gauc_std']:.4f}" if r["gauc_std"] is not None else "")
        lh = "-" if r["gauc_long_history"] is None else f"{r['gauc_long_history']:.4f}"
        lines.append(f"{_label(r):<24} {r['source'] or '-':<7} {g:>16} {r['gauc_min']:.4f}..{r['gauc_max']:.4f} "
                     f"{r['auc']:>7.4f} {lh:>9}  {_status(r, spreads)}")
    lines.append(f"GAUC on {n_test:,} test impressions; mean over {seeds} seed(s)"
                 + (", +- = standard deviation over the seeds" if seeds > 1 else "")
                 + "; long-hist = GAUC of the users with the longest histories")
    return "\n".join(lines)


def _verdict(rows: list[dict[str, Any]], spreads: dict[str, Any], world: _World) -> list[str]:
    """What the table says, in words: what is not a result, the best line, and MUSE against DIN."""
    out = []
    test_users = _n_test_users(world.dataset)
    if test_users < MIN_TEST_USERS:
        out.append(f"note: only {test_users} test users; differences between models here are noise "
                   "(the standard size is the one to read)")
    for r in rows:
        if _status(r, spreads):
            out.append(f"{_label(r)} on {r['source']}: {_status(r, spreads)}")
    valid = [r for r in rows if not _status(r, spreads)]
    if valid:
        best = max(valid, key=lambda r: r["gauc"])
        out.append(f"best: {_label(best)} on {best['source']}, GAUC {best['gauc']:.4f}")
    for r in rows:
        din = next((d for d in rows if d["model"] == "din" and d["source"] == r["source"]), None)
        if r["model"] != "muse" or din is None or _status(r, spreads):
            continue
        gap = r["gauc"] - din["gauc"]
        noise = 2 * max(r["gauc_std"] or 0.0, din["gauc_std"] or 0.0)
        if gap <= 0:
            word = "NOT above"
        elif noise == 0:
            word = "above (one seed: no spread to compare with)"
        elif gap > noise:
            word = "above"
        else:
            word = "above, but within twice the seed spread,"
        out.append(f"muse on {r['source']} is {word} DIN on {r['source']}: {gap:+.4f} GAUC")
    return out


def _n_test(ds: Any) -> int:
    return sum(b.num_rows for b in ds.iter_impressions(split="test", batch_size=65536))


def _n_test_users(ds: Any) -> int:
    import numpy as np

    users = [b.column("user_id").to_numpy() for b in ds.iter_impressions(split="test", batch_size=65536)]
    return int(len(np.unique(np.concatenate(users)))) if users else 0
