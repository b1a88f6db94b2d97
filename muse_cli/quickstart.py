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
    _retrieval_example(settings, name, main_source, world, spreads[main_source]["version"])

    stages.begin(f"rankers: {', '.join(args.models)} x {args.seeds} seed(s)")
    rows = _rankers(settings, name, args.models, args.sources, args.seeds)
    stages.end()

    print()
    table = _table(rows, spreads, _n_test(world.dataset))
    print(table)
    verdict = _verdict(rows, spreads, world)
    for line in verdict:
        print(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = _chart(rows, out_dir / "compare.png", f"{name}: GAUC over {args.seeds} seed(s)")
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
        from muse.data.simworld_vocab import TOP_CATEGORIES

        top, sub = divmod(int(category) - 1, self.config.leaves_per_top)
        try:
            return f"{TOP_CATEGORIES[top][0]}/{TOP_CATEGORIES[top][1][sub][0]}"
        except IndexError:
            return str(category)


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


def _retrieval_example(settings: Any, dataset: str, source: str, world: _World, version: int | None = None,
                       k: int = 8) -> None:
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

    with Retriever.from_settings(source=source, settings=settings, dataset=dataset, version=version) as r:
        lengths = r.prefetch([user]).result(timeout=120)
        full = r.search(user, [target], k=min(1000, max(k, lengths.get(user, k) or k)))
        version = full.version
    hits = full[0]
    if not len(hits):
        print(f"      user {user} has no behaviours in {source}; the backfill did not write them")
        return
    scores = hits.scores.astype(np.float64)
    behaviour_items = hits.behaviour_item_ids.astype(np.int64)
    print(f"      {source} v{version}; user {user}: {lengths.get(user, len(hits))} behaviours prefetched; target item {target} "
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
    """Every model on the first source, din and muse on the others, ``seeds`` seeds each, through
    :func:`ranker.compare.compare` (which reuses matching recorded runs); one row per model and source."""
    import functools

    from indexer.item_vectors import item_vectors
    from ranker.compare import compare

    def show(row: Any) -> None:
        how = "reused" if row.reused else f"{row.metrics['train']['seconds']:.0f} s"
        print(f"      {row.model:<9} {row.source or '-':<9} seed {row.seed}: GAUC {row.metrics['overall']['gauc']:.4f}  "
              f"(run {row.run_id}, {how})", flush=True)

    groups = [(models, sources[:1])]
    pair = [m for m in ("din", "muse") if m in models]  # MUSE against DIN on every source
    if pair and len(sources) > 1:
        groups.append((pair, sources[1:]))
    rows: list[dict[str, Any]] = []
    for group_models, group_sources in groups:
        res = compare(settings, dataset, models=group_models, sources=group_sources, seeds=list(range(seeds)),
                      on_row=show, write_files=False, vectors_for=functools.partial(item_vectors, settings))
        for cell in res.result["cells"]:
            m = cell["metrics"]
            rows.append({
                "model": cell["model"], "esu": cell["esu"], "source": cell["source"], "seeds": len(cell["seeds"]),
                "runs": cell["runs"], "comparison": res.comparison_id,
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


def _chart(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """The comparison's bar chart (:func:`ranker.compare.render_plot`: error bars over seeds, a line at
    GAUC 0.5, the axis from 0 to 1) over every line of the table."""
    from ranker.compare import render_plot

    def spread(r: dict[str, Any], key: str) -> dict[str, Any]:
        return {"mean": r[key], "std": r.get(f"{key}_std") or 0.0, "n": r["seeds"]}

    cells = [{"model": r["model"], "esu": r["esu"], "source": r["source"],
              "metrics": {"gauc": spread(r, "gauc")}} for r in rows]
    return render_plot({"cells": cells}, path, title)
