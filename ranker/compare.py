"""The embedding-source x model matrix: train and evaluate every combination on one dataset and
write a table (Markdown + JSON) and a bar plot (PNG) of GAUC.

Models that do not use an embedding source (``din``, ``sim-hard``, ``sim-soft``, ``twin``) are
trained once; ``muse`` once per source and ESU variant.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muse.errors import ConfigurationError
from muse.settings import Settings
from ranker.models import ESU_VARIANTS, list_models, model_class
from ranker.train import TrainConfig, train

log = logging.getLogger(__name__)

#: Metrics shown in the table, in order.
TABLE_METRICS = ("gauc", "auc", "logloss")


@dataclass(frozen=True)
class CompareRow:
    """One trained combination."""

    model: str
    esu: str | None
    source: str | None
    run_id: int | None
    seed: int
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        return self.model if self.esu is None else f"{self.model} ({self.esu})"


@dataclass(frozen=True)
class CompareResult:
    rows: list[CompareRow]
    table: str  # Markdown
    table_path: Path
    json_path: Path
    plot_path: Path


def plan(models: Sequence[str], sources: Sequence[str],
         esus: Sequence[str] | None = None) -> list[tuple[str, str, str | None]]:
    """The ``(model, esu, source)`` combinations to train. ``esus`` None or ``"default"``: each
    model's own ESU (the paper's set-up); a variant is tried on every model that accepts it.
    Models whose GSU or ESU uses item vectors get one combination per source."""
    from ranker.models import make_config

    for m in models:
        model_class(m)  # raises naming the valid models
    wanted = list(esus or ["default"])
    for e in wanted:
        if e != "default" and e not in ESU_VARIANTS:
            raise ConfigurationError(f"ESU variant {e!r} is unknown; valid: default, {', '.join(ESU_VARIANTS)}")
    out: list[tuple[str, str, str | None]] = []
    for m in models:
        for e in wanted:
            config = make_config(m) if e == "default" else None
            if config is None:
                try:
                    config = make_config(m, esu=e)
                except ConfigurationError:
                    log.info("compare: %s has no ESU %s; skipped", m, e)
                    continue
            if (m, config.esu) in {(x[0], x[1]) for x in out}:
                continue
            if config.needs_vectors:
                if not sources:
                    raise ConfigurationError(f"model {m!r} with ESU {config.esu} needs at least one embedding source")
                out += [(m, config.esu, s) for s in sources]
            else:
                out.append((m, config.esu, None))
    return out


def render_table(rows: Sequence[CompareRow], sources: Sequence[str]) -> str:
    """A Markdown table: one row per model (and ESU), one GAUC column per source (models without a
    source show the same value in every column), then AUC and logloss of the first column."""
    head = "| model | " + " | ".join(f"GAUC ({s})" for s in sources) + " | AUC | logloss | seed | runs |"
    lines = [head, "|" + "---|" * (len(sources) + 5)]
    by_label: dict[str, dict[str | None, CompareRow]] = {}
    for r in rows:
        by_label.setdefault(r.label, {})[r.source] = r
    for label, per_source in by_label.items():
        cells, first = [], None
        for s in sources:
            r = per_source.get(s) or per_source.get(None)
            first = first or r
            cells.append(f"{r.metrics['overall']['gauc']:.4f}" if r else "-")
        runs = ",".join(str(r.run_id) for r in per_source.values())
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {first.metrics['overall']['auc']:.4f} | {first.metrics['overall']['logloss']:.4f}"
                     + f" | {first.seed} | {runs} |")
    return "\n".join(lines) + "\n"


def render_plot(rows: Sequence[CompareRow], path: Path, title: str) -> Path:
    """A horizontal bar chart of GAUC per combination."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label + (f" / {r.source}" if r.source else "") for r in rows]
    values = [r.metrics["overall"]["gauc"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    ax.barh(labels, values, color=["tab:orange" if r.source else "tab:blue" for r in rows])
    lo = min(values) if values else 0.5
    ax.set_xlim(max(0.0, lo - 0.02), max(values + [lo]) + 0.01)
    ax.set_xlabel("GAUC (test)")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(settings: Settings, dataset: str, models: Sequence[str] | None = None, sources: Sequence[str] = ("scl",),
            esus: Sequence[str] | None = None, train_config: TrainConfig | None = None,
            model_overrides: dict[str, Any] | None = None, out_dir: Path | None = None,
            on_row: Callable[[CompareRow], None] | None = None, progress: bool = False) -> CompareResult:
    """Train and evaluate every combination; write ``compare.md``, ``compare.json``, ``compare.png``.

    Args:
        models: model names (default all); sources: GSU sources for muse; esus: muse ESU variants.
        out_dir: where to write (default ``$MUSE_DATA_DIR/ranker/compare-<dataset>``).
        on_row: called after each combination (the CLI prints progress).
    """
    cfg = train_config or TrainConfig()
    todo = plan(list(models or list_models()), list(sources), esus)
    out_dir = out_dir or settings.path("ranker", f"compare-{dataset}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[CompareRow] = []
    for model, esu, source in todo:
        log.info("compare: training %s esu=%s source=%s", model, esu, source)
        res = train(settings, model, dataset, source=source, esu=esu, train_config=cfg,
                    model_overrides=model_overrides, progress=progress)
        row = CompareRow(model, esu, source, res.run_id, cfg.seed, res.metrics)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    table = render_table(rows, list(sources) or ["-"])
    table_path = out_dir / "compare.md"
    table_path.write_text(f"# {dataset}: GAUC by model and embedding source (seed {cfg.seed})\n\n{table}")
    json_path = out_dir / "compare.json"
    json_path.write_text(json.dumps([r.__dict__ | {"label": r.label} for r in rows], indent=2, default=str))
    plot_path = render_plot(rows, out_dir / "compare.png", f"{dataset} (seed {cfg.seed})")
    return CompareResult(rows, table, table_path, json_path, plot_path)
