"""The embedding-source x model matrix as a first-class result.

``compare`` trains every (model, ESU, source) combination for every seed, reusing a recorded run
when one matches exactly (same dataset, source version (the dataset's own for an imported source),
model, ESU, model and train config, and seed), whatever was trained in between, aggregates mean and
spread over seeds of GAUC, AUC, logloss and the long-tail and long-history GAUC slices, says which
cells are undertrained (:func:`ranker.schedule.undertrained`), puts each source's intrinsic metrics
(``muse embed eval``) beside them, stores the comparison in the ``comparisons`` table (with its runs
in ``comparison_runs``; the same matrix on the same runs again is the stored comparison, not a
copy) and writes, under the comparison's id, a table (``comparison-<id>.md``, Markdown, and
``.json``) and a bar plot (``comparison-<id>.png``: a colour per source with a legend, error bars over
seeds, a line at GAUC 0.5, the axis from 0 to 1 so that small gaps look as small as they are).

Models whose GSU and ESU use no embedding source (``--esu ta`` baselines) are trained once per seed;
the others once per source and seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings
from ranker.data import ItemVectorsLike, VectorsFor
from ranker.models import ESU_VARIANTS, list_models, make_config, model_class
from ranker.schedule import plan_schedule, undertrained
from ranker.train import RankTrainConfig, train

log = logging.getLogger(__name__)

#: Metrics aggregated per cell: name -> (slice, metric) in a run's metrics.
CELL_METRICS: dict[str, tuple[str, str]] = {
    "gauc": ("overall", "gauc"),
    "auc": ("overall", "auc"),
    "logloss": ("overall", "logloss"),
    "gauc_long_tail": ("long_tail", "gauc"),
    "gauc_long_history": ("long_history", "gauc"),
}
#: Intrinsic source metrics shown beside the matrix (keys of ``muse embed eval``'s results).
INTRINSIC_METRICS = ("q2p_recall@50", "i2i_recall@10", "i2i_recall@10_tail", "mean_cosine")


def plan(models: Sequence[str], sources: Sequence[str],
         esus: Sequence[str] | None = None) -> list[tuple[str, str, str | None]]:
    """The ``(model, esu, source)`` combinations to train. ``esus`` None or ``"default"``: each
    model's own ESU (the paper's set-up); a variant is tried on every model that accepts it.
    Models whose GSU or ESU uses item vectors get one combination per source."""
    for m in models:
        model_class(m)  # raises naming the valid models
    wanted = list(esus or ["default"])
    for e in wanted:
        if e != "default" and e not in ESU_VARIANTS:
            raise ConfigurationError(f"ESU variant {e!r} is unknown; valid: default, {', '.join(ESU_VARIANTS)}")
    out: list[tuple[str, str, str | None]] = []
    for m in models:
        for e in wanted:
            try:
                config = make_config(m) if e == "default" else make_config(m, esu=e)
            except ConfigurationError:
                log.info("compare: %s has no ESU %s; skipped", m, e)
                continue
            if any(x[0] == m and x[1] == config.esu for x in out):
                continue
            if config.needs_vectors:
                if not sources:
                    raise ConfigurationError(f"model {m!r} with ESU {config.esu} needs at least one embedding source")
                out += [(m, config.esu, s) for s in sources]
            else:
                out.append((m, config.esu, None))
    if not out:
        raise ConfigurationError("nothing to compare: no model accepts the given ESU variants")
    return out


@dataclass(frozen=True)
class CompareRow:
    """One trained (or reused) run of one cell."""

    model: str
    esu: str
    source: str | None
    run_id: int | None
    seed: int
    metrics: dict[str, Any]
    reused: bool = False

    @property
    def label(self) -> str:
        return f"{self.model} ({self.esu})"

    @property
    def undertrained(self) -> str | None:
        """Why the run is not a result (:func:`ranker.schedule.undertrained`), or None."""
        return undertrained(self.metrics)


@dataclass(frozen=True)
class CompareResult:
    comparison_id: int | None
    result: dict[str, Any]  # what is stored in the comparisons row (see :func:`aggregate`)
    rows: list[CompareRow]
    table: str  # Markdown
    table_path: Path | None
    json_path: Path | None
    plot_path: Path | None
    stored_before: bool = False  # the same matrix on the same runs was stored already (its id is given)


def _metric(metrics: dict[str, Any], slice_name: str, name: str) -> float | None:
    v = (metrics.get(slice_name) or {}).get(name)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _spread(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": values}


def aggregate(rows: Sequence[CompareRow], spec: dict[str, Any], intrinsic: dict[str, Any]) -> dict[str, Any]:
    """Cells (model, ESU, source) with mean and sample std over seeds of every :data:`CELL_METRICS`."""
    cells: dict[tuple[str, str, str | None], list[CompareRow]] = {}
    for r in rows:
        cells.setdefault((r.model, r.esu, r.source), []).append(r)
    out = []
    for (model, esu, source), rs in cells.items():
        out.append({
            "model": model, "esu": esu, "source": source,
            "runs": [r.run_id for r in rs], "seeds": [r.seed for r in rs],
            "reused": sum(r.reused for r in rs),
            "metrics": {name: _spread([_metric(r.metrics, *where) for r in rs])
                        for name, where in CELL_METRICS.items()},
            "undertrained": [r.undertrained for r in rs if r.undertrained],
        })
    return {"spec": spec, "cells": out, "intrinsic": intrinsic}


def _fmt(s: dict[str, Any], digits: int = 4) -> str:
    if s.get("mean") is None:
        return "-"
    if s.get("n", 1) > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def verdict(gauc: dict[str, Any]) -> str:
    """Words for a cell that is not distinguishable from chance (GAUC 0.5)."""
    mean, std = gauc.get("mean"), gauc.get("std") or 0.0
    if mean is None:
        return "no GAUC"
    if abs(mean - 0.5) < max(0.01, 2 * std):
        return "at chance"
    return ""


def cell_note(cell: dict[str, Any]) -> str:
    """The note of a stored cell, in words: undertrained runs (not a result), else at chance."""
    under = cell.get("undertrained") or []
    if under:
        n = len(cell.get("runs") or [])
        head = "undertrained, not a result" if len(under) == n else f"{len(under)} of {n} runs undertrained"
        return f"{head} ({under[0].removeprefix('undertrained: ')})"
    return verdict(cell["metrics"]["gauc"])


def intrinsic_lines(intrinsic: dict[str, Any]) -> list[str]:
    """The intrinsic-metrics block (Markdown) of a comparison: one row per source, its version and its
    ``muse embed eval`` metrics on the dataset, or the same words for every source not evaluated."""
    if not intrinsic:
        return []
    lines = ["", "Intrinsic metrics of the sources (`muse embed eval`, stored with the source version):", "",
             "| source | version | " + " | ".join(INTRINSIC_METRICS) + " |",
             "|---|---|" + "---|" * len(INTRINSIC_METRICS)]
    for source, info in intrinsic.items():
        ev = info.get("eval") or {}
        cells = " | ".join("-" if ev.get(k) is None else f"{ev[k]:.4f}" for k in INTRINSIC_METRICS)
        note = "" if ev else " (not evaluated: run `muse embed eval`)"
        version = info.get("version") or ("unknown" if info.get("provenance") else "-")
        lines.append(f"| {source}{note} | {version} | {cells} |")
    return lines


def render_table(result: dict[str, Any]) -> str:
    """The Markdown report of a stored comparison (the same text for a fresh run and ``--show``)."""
    spec = result["spec"]
    seeds = spec.get("seeds", [])
    schedule = spec.get("schedule") or {}
    batch = schedule.get("batch_size") or spec.get("train", {}).get("batch_size")
    steps = f" ({schedule['steps_per_epoch']} steps per epoch)" if schedule.get("steps_per_epoch") else ""
    lines = [f"Dataset `{spec.get('dataset')}`, seeds {', '.join(map(str, seeds))} "
             f"(mean ± sample std over seeds), batch {batch}{steps}, "
             f"{spec.get('threads') or 'default'} torch thread(s)"
             f"{_processes(spec)}.", "",
             "| model (ESU) | source | GAUC | AUC | logloss | GAUC long-tail | GAUC long-history | runs | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        m = c["metrics"]
        runs = ",".join(str(r) for r in c["runs"]) + (f" ({c['reused']} reused)" if c.get("reused") else "")
        lines.append(f"| {c['model']} ({c['esu']}) | {c['source'] or '-'} | {_fmt(m['gauc'])} | {_fmt(m['auc'])} | "
                     f"{_fmt(m['logloss'])} | {_fmt(m['gauc_long_tail'])} | {_fmt(m['gauc_long_history'])} | "
                     f"{runs} | {cell_note(c)} |")
    lines += intrinsic_lines(result.get("intrinsic") or {})
    return "\n".join(lines) + "\n"


#: Bar colours, one per source in the order the sources first appear (matplotlib's tab10 cycle).
SOURCE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:olive", "tab:cyan")
#: The colour of cells that read no source (the ID-only ESU baselines).
NO_SOURCE_COLOUR = "tab:gray"


def source_colours(cells: Sequence[dict[str, Any]]) -> dict[str | None, str]:
    """A colour per source of ``cells`` (first come, first served; None: no source)."""
    out: dict[str | None, str] = {}
    for c in cells:
        if c["source"] not in out:
            named = sum(1 for s in out if s is not None)
            out[c["source"]] = NO_SOURCE_COLOUR if c["source"] is None else SOURCE_COLOURS[named % len(SOURCE_COLOURS)]
    return out


def _processes(spec: dict[str, Any]) -> str:
    """Words for a comparison trained by several processes (empty for one)."""
    p = spec.get("processes")
    return f" per process, {p['world_size']} processes ({p['backend']})" if p else ""


def render_plot(result: dict[str, Any], path: Path, title: str) -> Path:
    """Horizontal bars of mean GAUC per cell, a colour per source with a legend, the spread over
    seeds as error bars, a line at 0.5 (chance) and the axis from 0 to 1; undertrained cells hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cells = [c for c in result["cells"] if c["metrics"]["gauc"]["mean"] is not None]
    labels = [f"{c['model']} ({c['esu']})" + (f" / {c['source']}" if c["source"] else "") for c in cells]
    means = [c["metrics"]["gauc"]["mean"] for c in cells]
    stds = [c["metrics"]["gauc"]["std"] or 0.0 for c in cells]
    colours = source_colours(cells)
    fig, ax = plt.subplots(figsize=(10.0, 0.42 * len(cells) + 1.8))
    bars = ax.barh(labels, means, xerr=stds, capsize=3, color=[colours[c["source"]] for c in cells])
    for bar, c in zip(bars, cells, strict=True):
        if c.get("undertrained"):
            bar.set_hatch("//")
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    handles = [Patch(color=colour, label=f"source {s}" if s else "no source (ID-only ESU)")
               for s, colour in colours.items()]
    handles.append(plt.Line2D([0], [0], color="black", linestyle="--", linewidth=1, label="chance (GAUC 0.5)"))
    if any(c.get("undertrained") for c in cells):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="undertrained (not a result)"))
    ax.set_xlim(0.0, 1.0)
    for y, (m, s) in enumerate(zip(means, stds, strict=True)):
        ax.text(min(m + s + 0.01, 0.9), y, f"{m:.4f}", va="center", fontsize=8)
    ax.set_xlabel("GAUC (test), mean ± std over seeds")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# storage ------------------------------------------------------------------------------------------------


def find_reusable_run(settings: Settings, *, model: str, esu: str, source: str | None, dataset: str, seed: int,
                      model_config: dict[str, Any], train_config: dict[str, Any], world_size: int = 1) -> Any:
    """A finished run with exactly this set-up, or None: the same dataset, source version (the one a
    run on ``dataset`` reads now, :func:`ranker.runs.source_id`), model, ESU, model and train config
    (``train_config`` with its batch size resolved, as runs record it), seed, and number of processes
    (``world_size``: ranks split the batches differently, so the numbers differ). Runs trained in between
    on other datasets or set-ups do not matter."""
    from muse import models
    from muse.db import session_scope
    from ranker.runs import _info, _jsonable, dataset_id, source_id

    want = _jsonable({"model": model_config, "train": train_config})
    ds_id = dataset_id(settings, dataset)
    src_id = source_id(settings, source, dataset)
    with session_scope(settings) as session:
        q = (select(models.RankerRun)
             .where(models.RankerRun.model == model, models.RankerRun.esu == esu,
                    models.RankerRun.dataset_id == ds_id, models.RankerRun.seed == seed,
                    models.RankerRun.status == "done")
             .order_by(models.RankerRun.id.desc()))
        for row in session.scalars(q):
            if row.source_name != source or row.source_id != src_id:
                continue
            cfg = row.config or {}
            if cfg.get("model") == want["model"] and cfg.get("train") == want["train"] and row.checkpoint_path \
                    and (cfg.get("distributed") or {}).get("world_size", 1) == world_size:
                return _info(row, dataset)
    return None


def intrinsic_metrics(settings: Settings, sources: Sequence[str], dataset: str) -> dict[str, Any]:
    """Per source, the version a run on ``dataset`` reads (:func:`ranker.runs.source_row`: the
    dataset's own for an imported source) and that version's ``muse embed eval`` metrics on ``dataset``."""
    from muse.db import session_scope
    from ranker.runs import source_row

    out: dict[str, Any] = {}
    with session_scope(settings) as session:
        for name in sources:
            row = source_row(session, name, dataset)
            ev = ((row.metrics or {}).get("eval") or {}).get(dataset) if row is not None else None
            out[name] = {"version": None if row is None else row.version, "eval": ev}
    return out


def save_comparison(settings: Settings, dataset: str, result: dict[str, Any], rows: Sequence[CompareRow]) -> int:
    """Store a comparison and its runs; return its id."""
    from muse import models
    from muse.db import session_scope
    from ranker.runs import _jsonable, dataset_id

    with session_scope(settings) as session:
        row = models.Comparison(dataset_id=dataset_id(settings, dataset), spec=_jsonable(result["spec"]),
                                result=_jsonable(result))
        session.add(row)
        session.flush()
        seen = set()
        for r in rows:
            if r.run_id is not None and r.run_id not in seen:
                seen.add(r.run_id)
                session.add(models.ComparisonRun(comparison_id=row.id, run_id=r.run_id, reused=r.reused))
        return row.id


def get_comparison(settings: Settings, comparison_id: int) -> dict[str, Any]:
    """The stored result of comparison ``comparison_id`` (with ``id``, ``created_at`` and its run ids).

    Raises:
        NotFoundError: no such comparison.
    """
    from muse import models
    from muse.db import session_scope

    with session_scope(settings) as session:
        row = session.get(models.Comparison, int(comparison_id))
        if row is None:
            raise NotFoundError(f"comparison {comparison_id} does not exist (see `muse compare --list`)")
        runs = session.scalars(select(models.ComparisonRun.run_id)
                               .where(models.ComparisonRun.comparison_id == row.id)).all()
        return {**dict(row.result), "id": row.id, "created_at": row.created_at.isoformat(), "run_ids": sorted(runs)}


def list_comparisons(settings: Settings) -> list[dict[str, Any]]:
    """Every stored comparison: id, dataset, models, sources, seeds, when."""
    from muse import models
    from muse.db import session_scope

    with session_scope(settings) as session:
        names = {d.id: d.name for d in session.scalars(select(models.Dataset))}
        return [{"id": c.id, "dataset": names.get(c.dataset_id, "?"), "models": c.spec.get("models"),
                 "sources": c.spec.get("sources"), "seeds": c.spec.get("seeds"),
                 "created_at": c.created_at.isoformat()}
                for c in session.scalars(select(models.Comparison).order_by(models.Comparison.id))]


# the comparison ---------------------------------------------------------------------------------------


def compare(settings: Settings, dataset: str, models: Sequence[str] | None = None, sources: Sequence[str] = ("scl",),
            esus: Sequence[str] | None = None, train_config: RankTrainConfig | None = None,
            model_overrides: dict[str, Any] | None = None, out_dir: Path | None = None,
            on_row: Callable[[CompareRow], None] | None = None, progress: bool = False,
            seeds: Sequence[int] | None = None, reuse: bool = True, threads: int | None = None,
            write_files: bool = True, config: dict[str, Any] | None = None,
            vectors_for: VectorsFor | None = None,
            groups: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None, dist: Any = None) -> CompareResult:
    """Train (or reuse) and evaluate every combination for every seed; store and write the result.

    Args:
        models: model names (default all); sources: embedding sources for the models that need one;
            esus: ESU variants (default: each model's own, the paper's set-up).
        groups: several ``(models, sources)`` matrices in one comparison (e.g. every model on one
            source and two of them on the others); replaces ``models`` and ``sources`` when given.
        seeds: the seeds (default: the train config's seed only).
        reuse: reuse a recorded run with exactly the same set-up instead of training again; a
            comparison of the same matrix on the same runs as a stored one is that stored one (its id
            is returned and nothing new is stored).
        threads: the torch thread count used (recorded; the CLI picks the fastest).
        out_dir: where to write ``comparison-<id>.md|.json|.png`` (default
            ``$MUSE_DATA_DIR/ranker/compare-<dataset>``).
        on_row: called after each run (the CLI prints progress).
        config: how the comparison was asked for (the CLI's ``--config`` file merged with its flags),
            stored with it as ``spec["config"]`` (:func:`with_config`).
        vectors_for: ``vectors_for(source, dataset)`` gives a source's item vectors for the runs that
            read them (the CLI passes the embedding stage's ``item_vectors``); called once per source.
        dist: this process is one rank of a distributed comparison (:class:`ranker.distributed.Dist`):
            every run is trained by all ranks; rank 0 decides reuse, stores and writes the comparison
            (the other ranks return a result without id or files).
    """
    import torch

    from muse.data.format import Dataset

    cfg = train_config or RankTrainConfig()
    matrices = [(list(m), list(s)) for m, s in groups] if groups else [(list(models or list_models()), list(sources))]
    todo: list[tuple[str, str, str | None]] = []
    for group_models, group_sources in matrices:
        todo += [t for t in plan(group_models, group_sources, esus) if t not in todo]
    all_models = list(dict.fromkeys(m for ms, _ in matrices for m in ms))
    all_sources = list(dict.fromkeys(x for _, ss in matrices for x in ss))
    seed_list = list(seeds) if seeds else [cfg.seed]
    overrides = dict(model_overrides or {})
    # The batch size every run of the matrix trains with (ranker.schedule's rule on this dataset), so
    # that reuse compares against what runs record.
    resolved, schedule = plan_schedule(cfg, Dataset.open(settings, dataset))
    loaded_vectors: dict[str, ItemVectorsLike] = {}
    rows: list[CompareRow] = []
    for model, esu, source in todo:
        for seed in seed_list:
            run_cfg = dataclasses.replace(cfg, seed=seed)
            found = None
            if reuse and (dist is None or dist.is_main):
                model_config = make_config(model, **{**overrides, "esu": esu}).to_dict()
                found = find_reusable_run(settings, model=model, esu=esu, source=source, dataset=dataset, seed=seed,
                                          model_config=model_config,
                                          train_config=dataclasses.asdict(dataclasses.replace(resolved, seed=seed)),
                                          world_size=1 if dist is None else dist.world)
            if dist is not None:
                found = dist.broadcast(found)
            if found is not None:
                row = CompareRow(model, esu, source, found.id, seed, found.metrics, reused=True)
            else:
                log.info("compare: training %s esu=%s source=%s seed=%d", model, esu, source, seed)
                res = train(settings, model, dataset, source=source, esu=esu, train_config=run_cfg,
                            model_overrides=overrides, progress=progress,
                            vectors=_vectors_of(vectors_for, source, dataset, loaded_vectors), dist=dist)
                row = CompareRow(model, esu, source, res.run_id, seed, res.metrics)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    spec = {"dataset": dataset, "models": all_models, "sources": all_sources, "esus": list(esus or ["default"]),
            "seeds": seed_list, "train": dataclasses.asdict(cfg) | {"seed": None}, "overrides": overrides,
            "threads": threads or torch.get_num_threads(), "schedule": schedule.to_dict()}
    if groups:
        spec["groups"] = [[m, x] for m, x in matrices]
    if dist is not None:
        spec["processes"] = {"world_size": dist.world, "backend": dist.backend, "launcher": dist.launcher}
        if not dist.is_main:
            return CompareResult(None, {"spec": spec}, rows, "", None, None, None)
    spec = with_config(spec, config)
    used_sources = sorted({r.source for r in rows if r.source})
    result = aggregate(rows, spec, intrinsic_metrics(settings, used_sources, dataset))
    comparison_id = find_stored_comparison(settings, dataset, result) if reuse else None
    stored_before = comparison_id is not None
    if comparison_id is None:
        comparison_id = save_comparison(settings, dataset, result, rows)
    else:
        log.info("compare: the same matrix on the same runs is stored comparison %d; not stored again",
                 comparison_id)
    result = get_comparison(settings, comparison_id)
    table = render_table(result)
    table_path = json_path = plot_path = None
    if write_files:
        table_path, json_path, plot_path = write_comparison(
            result, out_dir or settings.path("ranker", f"compare-{dataset}"))
    return CompareResult(comparison_id, result, rows, table, table_path, json_path, plot_path, stored_before)


#: Keys of a comparison's spec that say how it was run, not what it is: two comparisons that differ
#: only there are the same comparison.
_CIRCUMSTANCES = ("config", "threads")


def _identity(result: dict[str, Any]) -> Any:
    """What makes two comparisons the same: the spec (less its circumstances), the cells' runs and the
    sources' intrinsic metrics."""
    from ranker.runs import _jsonable

    spec = {k: v for k, v in (result.get("spec") or {}).items() if k not in _CIRCUMSTANCES}
    cells = [(c["model"], c["esu"], c["source"], list(c["runs"]), list(c["seeds"])) for c in result["cells"]]
    return _jsonable({"spec": spec, "cells": cells, "intrinsic": result.get("intrinsic") or {}})


def find_stored_comparison(settings: Settings, dataset: str, result: dict[str, Any]) -> int | None:
    """The id of a stored comparison of ``dataset`` with the same matrix and the very same runs as
    ``result`` (:func:`aggregate`'s), or None."""
    from muse import models
    from muse.db import session_scope
    from ranker.runs import dataset_id

    want = _identity(result)
    with session_scope(settings) as session:
        q = (select(models.Comparison).where(models.Comparison.dataset_id == dataset_id(settings, dataset))
             .order_by(models.Comparison.id.desc()))
        for row in session.scalars(q):
            if _identity(dict(row.result or {})) == want:
                return row.id
    return None


def comparison_paths(out_dir: Path, comparison_id: int) -> tuple[Path, Path, Path]:
    """``comparison-<id>.md``, ``.json`` and ``.png`` in ``out_dir``: every comparison keeps its own."""
    stem = out_dir / f"comparison-{comparison_id}"
    return stem.with_suffix(".md"), stem.with_suffix(".json"), stem.with_suffix(".png")


def write_comparison(result: dict[str, Any], out_dir: Path, extra: Sequence[str] = ()) -> tuple[Path, Path, Path]:
    """Write a stored comparison's Markdown report (a heading, the table, ``extra`` lines as a list),
    its JSON and its chart under its id in ``out_dir``; returns the three paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison_id, dataset = result["id"], result["spec"].get("dataset")
    table_path, json_path, plot_path = comparison_paths(out_dir, comparison_id)
    notes = "".join(f"- {line}\n" for line in extra)
    table_path.write_text(f"# Comparison {comparison_id}: {dataset}\n\n{render_table(result)}"
                          + (f"\n{notes}" if notes else ""), encoding="utf-8")
    json_path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    seeds = len(result["spec"].get("seeds") or [])
    render_plot(result, plot_path, f"{dataset}: comparison {comparison_id} ({seeds} seed(s))")
    return table_path, json_path, plot_path


def with_config(spec: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """``spec`` with the matrix's description (``muse compare --config`` merged with the flags) under
    ``"config"``; unchanged without one. The ``comparisons.spec`` JSON column holds it (no new column)."""
    if not config:
        return spec
    return {**spec, "config": dict(config)}


def _vectors_of(vectors_for: VectorsFor | None, source: str | None, dataset: str,
                loaded: dict[str, ItemVectorsLike]) -> ItemVectorsLike | None:
    """``vectors_for(source, dataset)``, once per source (None without a source or a ``vectors_for``:
    :func:`ranker.train.train` then says what is missing when the model needs them)."""
    if source is None or vectors_for is None:
        return None
    if source not in loaded:
        loaded[source] = vectors_for(source, dataset)
    return loaded[source]


def pick_threads(settings: Settings, dataset: str, models: Sequence[str] | None, sources: Sequence[str],
                 esus: Sequence[str] | None, train_config: RankTrainConfig | None = None,
                 model_overrides: dict[str, Any] | None = None, candidates: Sequence[int] = (1, 2),
                 steps: int = 6, requested: int | None = None,
                 vectors_for: VectorsFor | None = None) -> int:
    """The torch thread count for a comparison, set (``torch.set_num_threads``) and returned.

    ``requested`` (``--threads N``) is used as given, without a probe. Otherwise each count of
    ``candidates`` up to the CPU count is timed on ``steps`` training steps of the comparison's
    heaviest model (a whole-history GSU if there is one), in two interleaved rounds (1, 2, 2, 1) so
    that a change of load during the probe favours neither, and the fastest is kept. On a shared
    machine two threads can be several times slower than one: the batch builder runs in its own
    thread, and an intra-op thread that waits for a busy core stalls every step.

    Raises:
        ConfigurationError: ``requested`` is not a positive integer.
    """
    import torch

    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigurationError(f"--threads {requested!r} must be a positive integer")
        torch.set_num_threads(requested)
        log.info("compare: %d torch thread(s), as requested", requested)
        return requested
    counts = thread_candidates(candidates)
    if len(counts) == 1:
        torch.set_num_threads(counts[0])
        return counts[0]
    rates = probe_thread_rates(settings, dataset, models, sources, esus, train_config, model_overrides, counts, steps,
                               vectors_for)
    best = max(counts, key=lambda n: rates[n])  # ties: the fewer threads
    log.info("compare: training samples/s by torch threads: %s; using %d", {n: round(r) for n, r in rates.items()},
             best)
    torch.set_num_threads(best)
    return best


def thread_candidates(candidates: Sequence[int] = (1, 2)) -> list[int]:
    """The distinct positive counts of ``candidates`` that do not exceed the CPU count (at least [1])."""
    import os

    cpus = os.cpu_count() or 1
    return sorted({int(n) for n in candidates if 1 <= int(n) <= cpus}) or [1]


def probe_thread_rates(settings: Settings, dataset: str, models: Sequence[str] | None, sources: Sequence[str],
                       esus: Sequence[str] | None, train_config: RankTrainConfig | None,
                       model_overrides: dict[str, Any] | None, counts: Sequence[int], steps: int,
                       vectors_for: VectorsFor | None = None) -> dict[int, float]:
    """Training samples/s of the comparison's heaviest model with each torch thread count of ``counts``
    (full pipeline, as :func:`ranker.train.train_steps` runs it), over two interleaved rounds."""
    import time

    import torch

    from muse.data.format import Dataset
    from ranker.data import iter_impression_batches, open_builder
    from ranker.models import FeatureSpec, build_model
    from ranker.train import train_steps

    todo = plan(list(models or list_models()), list(sources), esus)
    model, esu, source = max(todo, key=lambda t: model_class(t[0]).retrieval == "history")  # whole-history GSU
    config = make_config(model, **{**dict(model_overrides or {}), "esu": esu})
    ds = Dataset.open(settings, dataset)
    cfg, _ = plan_schedule(train_config or RankTrainConfig(), ds)  # the batch size the runs will use
    vectors = _vectors_of(vectors_for, source, dataset, {}) if source and config.needs_vectors else None
    builder = open_builder(ds, model_class(model).retrieval, config, vectors)
    half = max(1, (steps + 1) // 2)
    batches = list(iter_impression_batches(ds, "train", cfg.batch_size, limit=cfg.batch_size * (half + 1)))
    samples = {n: 0 for n in counts}
    seconds = {n: 0.0 for n in counts}
    nets = {}
    for order in (list(counts), list(reversed(counts))):
        for n in order:
            torch.set_num_threads(n)
            if n not in nets:
                torch.manual_seed(0)
                nets[n] = build_model(model, FeatureSpec(builder.space.vocab_sizes(), builder.space.user_fields),
                                      config)
                train_steps(nets[n], builder, batches[:1], cfg)  # warm-up
            started = time.perf_counter()
            _, k, _ = train_steps(nets[n], builder, batches[1:], cfg)
            samples[n] += k
            seconds[n] += time.perf_counter() - started
    return {n: samples[n] / max(seconds[n], 1e-9) for n in counts}
