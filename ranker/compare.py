"""The embedding-source x model matrix as a first-class result.

``compare`` trains every (model, ESU, source) combination for every seed, reusing a recorded run
when one matches exactly (same model, ESU, source version, dataset, seed, model and train config),
aggregates mean and spread over seeds of GAUC, AUC, logloss and the long-tail and long-history
GAUC slices, puts each source's intrinsic metrics (``muse embed eval``) beside them, stores the
comparison in the ``comparisons`` table (with its runs in ``comparison_runs``) and writes a table
(Markdown + JSON) and a bar plot (PNG: error bars over seeds, a line at GAUC 0.5, the axis from 0
to 1 so that small gaps look as small as they are).

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


@dataclass(frozen=True)
class CompareResult:
    comparison_id: int | None
    result: dict[str, Any]  # what is stored in the comparisons row (see :func:`aggregate`)
    rows: list[CompareRow]
    table: str  # Markdown
    table_path: Path | None
    json_path: Path | None
    plot_path: Path | None


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


def render_table(result: dict[str, Any]) -> str:
    """The Markdown report of a stored comparison (the same text for a fresh run and ``--show``)."""
    spec = result["spec"]
    seeds = spec.get("seeds", [])
    lines = [f"Dataset `{spec.get('dataset')}`, seeds {', '.join(map(str, seeds))} "
             f"(mean ± sample std over seeds), batch {spec.get('train', {}).get('batch_size')}, "
             f"{spec.get('threads') or 'default'} torch thread(s)"
             f"{_processes(spec)}.", "",
             "| model (ESU) | source | GAUC | AUC | logloss | GAUC long-tail | GAUC long-history | runs | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        m = c["metrics"]
        runs = ",".join(str(r) for r in c["runs"]) + (f" ({c['reused']} reused)" if c.get("reused") else "")
        lines.append(f"| {c['model']} ({c['esu']}) | {c['source'] or '-'} | {_fmt(m['gauc'])} | {_fmt(m['auc'])} | "
                     f"{_fmt(m['logloss'])} | {_fmt(m['gauc_long_tail'])} | {_fmt(m['gauc_long_history'])} | "
                     f"{runs} | {verdict(m['gauc'])} |")
    intrinsic = result.get("intrinsic") or {}
    if intrinsic:
        lines += ["", "Intrinsic metrics of the sources (`muse embed eval`, stored with the source version):", "",
                  "| source | version | " + " | ".join(INTRINSIC_METRICS) + " |",
                  "|---|---|" + "---|" * len(INTRINSIC_METRICS)]
        for source, info in intrinsic.items():
            ev = info.get("eval") or {}
            cells = " | ".join("-" if ev.get(k) is None else f"{ev[k]:.4f}" for k in INTRINSIC_METRICS)
            note = "" if ev else " (not evaluated: run `muse embed eval`)"
            lines.append(f"| {source}{note} | {info.get('version') or '-'} | {cells} |")
    return "\n".join(lines) + "\n"


def _processes(spec: dict[str, Any]) -> str:
    """Words for a comparison trained by several processes (empty for one)."""
    p = spec.get("processes")
    return f" per process, {p['world_size']} processes ({p['backend']})" if p else ""


def render_plot(result: dict[str, Any], path: Path, title: str) -> Path:
    """Horizontal bars of mean GAUC per cell with the spread over seeds as error bars, a line at 0.5
    (chance) and the axis from 0 to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c["metrics"]["gauc"]["mean"] is not None]
    labels = [f"{c['model']} ({c['esu']})" + (f" / {c['source']}" if c["source"] else "") for c in cells]
    means = [c["metrics"]["gauc"]["mean"] for c in cells]
    stds = [c["metrics"]["gauc"]["std"] or 0.0 for c in cells]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(cells) + 1.4))
    ax.barh(labels, means, xerr=stds, capsize=3, color=["tab:orange" if c["source"] else "tab:blue" for c in cells])
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1, label="chance (GAUC 0.5)")
    ax.set_xlim(0.0, 1.0)
    for y, (m, s) in enumerate(zip(means, stds, strict=True)):
        ax.text(min(m + s + 0.01, 0.9), y, f"{m:.4f}", va="center", fontsize=8)
    ax.set_xlabel("GAUC (test), mean ± std over seeds")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# storage ------------------------------------------------------------------------------------------------


def find_reusable_run(settings: Settings, *, model: str, esu: str, source: str | None, dataset: str, seed: int,
                      model_config: dict[str, Any], train_config: dict[str, Any], world_size: int = 1) -> Any:
    """A finished run with exactly this set-up (and the source's current version), trained by as many
    processes (``world_size``: ranks split the batches differently, so the numbers differ), or None."""
    from muse import models
    from muse.db import session_scope
    from ranker.runs import _info, _jsonable, dataset_id, source_id

    want = _jsonable({"model": model_config, "train": train_config})
    ds_id = dataset_id(settings, dataset)
    src_id = source_id(settings, source)
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
    """Per source, its newest version and that version's ``muse embed eval`` metrics on ``dataset``."""
    from muse import models
    from muse.db import session_scope

    out: dict[str, Any] = {}
    with session_scope(settings) as session:
        for name in sources:
            row = session.scalars(select(models.EmbeddingSource).where(models.EmbeddingSource.name == name)
                                  .order_by(models.EmbeddingSource.version.desc())).first()
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
            vectors_for: VectorsFor | None = None, dist: Any = None) -> CompareResult:
    """Train (or reuse) and evaluate every combination for every seed; store and write the result.

    Args:
        models: model names (default all); sources: embedding sources for the models that need one;
            esus: ESU variants (default: each model's own, the paper's set-up).
        seeds: the seeds (default: the train config's seed only).
        reuse: reuse a recorded run with exactly the same set-up instead of training again.
        threads: the torch thread count used (recorded; the CLI picks the fastest).
        out_dir: where to write (default ``$MUSE_DATA_DIR/ranker/compare-<dataset>``).
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

    cfg = train_config or RankTrainConfig()
    models = list(models or list_models())
    todo = plan(models, list(sources), esus)
    seed_list = list(seeds) if seeds else [cfg.seed]
    overrides = dict(model_overrides or {})
    loaded_vectors: dict[str, ItemVectorsLike] = {}
    rows: list[CompareRow] = []
    for model, esu, source in todo:
        for seed in seed_list:
            run_cfg = dataclasses.replace(cfg, seed=seed)
            found = None
            if reuse and (dist is None or dist.is_main):
                model_config = make_config(model, **{**overrides, "esu": esu}).to_dict()
                found = find_reusable_run(settings, model=model, esu=esu, source=source, dataset=dataset, seed=seed,
                                          model_config=model_config, train_config=dataclasses.asdict(run_cfg),
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
    spec = {"dataset": dataset, "models": models, "sources": list(sources), "esus": list(esus or ["default"]),
            "seeds": seed_list, "train": dataclasses.asdict(cfg) | {"seed": None}, "overrides": overrides,
            "threads": threads or torch.get_num_threads()}
    if dist is not None:
        spec["processes"] = {"world_size": dist.world, "backend": dist.backend, "launcher": dist.launcher}
        if not dist.is_main:
            return CompareResult(None, {"spec": spec}, rows, "", None, None, None)
    spec = with_config(spec, config)
    used_sources = sorted({r.source for r in rows if r.source})
    result = aggregate(rows, spec, intrinsic_metrics(settings, used_sources, dataset))
    comparison_id = save_comparison(settings, dataset, result, rows)
    result = get_comparison(settings, comparison_id)
    table = render_table(result)
    table_path = json_path = plot_path = None
    if write_files:
        out_dir = out_dir or settings.path("ranker", f"compare-{dataset}")
        out_dir.mkdir(parents=True, exist_ok=True)
        table_path = out_dir / "compare.md"
        table_path.write_text(f"# Comparison {comparison_id}: {dataset}\n\n{table}")
        json_path = out_dir / "compare.json"
        json_path.write_text(json.dumps(result, indent=2, default=str))
        plot_path = render_plot(result, out_dir / "compare.png",
                                f"{dataset}: comparison {comparison_id} ({len(seed_list)} seed(s))")
    return CompareResult(comparison_id, result, rows, table, table_path, json_path, plot_path)


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

    cfg = train_config or RankTrainConfig()
    todo = plan(list(models or list_models()), list(sources), esus)
    model, esu, source = max(todo, key=lambda t: model_class(t[0]).retrieval == "history")  # whole-history GSU
    config = make_config(model, **{**dict(model_overrides or {}), "esu": esu})
    ds = Dataset.open(settings, dataset)
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
