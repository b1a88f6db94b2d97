"""``muse embed``: train, list, import and evaluate embedding sources."""

from __future__ import annotations

import argparse
import json
from typing import Any

from muse_cli.config_files import add_config_option
from muse_cli.registries import LazyChoices, all_sources, imported_sources, trainable_sources

#: The source names the options accept, read from the indexer's registry when first needed.
TRAINABLE = LazyChoices(trainable_sources)
ALL_SOURCES = LazyChoices(all_sources)
IMPORTED = LazyChoices(imported_sources)
#: The effective ``muse embed train`` options, written beside the checkpoint of the version it registers.
OPTIONS_FILE = "train-options.toml"
METRIC_COLUMNS = (
    "q2p_recall@10", "q2p_recall@10_tail", "q2p_recall@50", "q2p_recall@50_tail",
    "i2i_recall@10", "i2i_recall@10_tail", "coverage", "mean_cosine",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="item embedding sources: train, list, import, evaluate")
    esub = p.add_subparsers(dest="embed_command", metavar="ACTION", required=True)

    tr = esub.add_parser("train", help="train a source on a dataset and register a new version")
    tr.add_argument("--source", choices=TRAINABLE, metavar="SOURCE", help="source to train (required): %(choices)s")
    tr.add_argument("--dataset", help="dataset name (required; see `muse data list`)")
    tr.add_argument("--epochs", type=int, help="passes over the training pairs (default 8 for scl, 10 for id, else 2)")
    tr.add_argument("--model", help="open_clip architecture (default muse-tiny-rn; see `muse embed models`)")
    tr.add_argument("--pretrained", help="local open_clip weights file to start from (never downloaded)")
    tr.add_argument("--batch-size", type=int, help="pairs per step (default 128)")
    tr.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    tr.add_argument("--temperature", type=float, help="contrastive softmax temperature (default 0.2 for i2i, else 0.07)")
    tr.add_argument("--queue-size", type=int, help="negative queue length for scl/i2i/id (default 0 = in-batch negatives only; capped at 25%% of the pairs)")
    tr.add_argument("--momentum", type=float, help="i2i: MoCo momentum key encoder, e.g. 0.99 (default 0 = none)")
    tr.add_argument("--augment", action=argparse.BooleanOptionalAction,
                    help="random crop/rotation/flip/brightness of training images (default: on for i2i only)")
    tr.add_argument("--view-weight", type=float,
                    help="weight of the same-item two-view term, needs --augment (default 0.1 for i2i, else 0)")
    tr.add_argument("--hard-weight", type=float, help="scl: weight of the clicked-not-purchased term (default 1)")
    tr.add_argument("--max-pairs", type=int, help="training pairs sampled per run (default: 4 per catalogue item, at most 10000)")
    tr.add_argument("--max-steps", type=int, help="stop after this many steps")
    tr.add_argument("--seed", type=int, help="random seed (default 0)")
    tr.add_argument("--eval", action="store_true", help="run the intrinsic evaluation after training")
    add_config_option(tr, "muse embed train", _train, required=("source", "dataset"))

    ls = esub.add_parser("list", help="list registered source versions")
    ls.add_argument("--source", choices=ALL_SOURCES, metavar="SOURCE", help="only this source: %(choices)s (default: all)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    im = esub.add_parser("import", help="register the vectors a dataset ships (embeddings/scl-taobao.parquet)")
    im.add_argument("--dataset", required=True, help="dataset name (see `muse data list`)")
    im.add_argument("--source", default="scl-taobao", choices=IMPORTED, metavar="SOURCE",
                    help="imported source: %(choices)s (default scl-taobao)")
    im.set_defaults(func=_import)

    ev = esub.add_parser("eval", help="intrinsic evaluation (recall@K) of sources on held-out users")
    ev.add_argument("--dataset", required=True, help="dataset name (see `muse data list`)")
    ev.add_argument("--sources", nargs="+", choices=ALL_SOURCES, metavar="SOURCE",
                    help="sources to evaluate, latest versions: %(choices)s (default: every registered one)")
    ev.add_argument("--max-queries", type=int, default=2000, help="held-out search sessions scored")
    ev.add_argument("--max-pairs", type=int, default=2000, help="held-out co-occurrence pairs scored")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(func=_eval)

    mo = esub.add_parser("models", help="list the open_clip architectures --model accepts")
    mo.add_argument("--json", action="store_true", help="print JSON instead of text")
    mo.set_defaults(func=_models)


def _train(args: argparse.Namespace) -> int:
    from indexer.training import EmbedTrainConfig, train_source
    from muse.settings import load_settings

    settings = load_settings()
    options = {
        "epochs": args.epochs, "model": args.model, "pretrained": args.pretrained,
        "batch_size": args.batch_size, "lr": args.lr, "temperature": args.temperature,
        "queue_size": args.queue_size, "momentum": args.momentum, "augment": args.augment,
        "view_weight": args.view_weight, "hard_weight": args.hard_weight, "max_pairs": args.max_pairs, "max_steps": args.max_steps,
        "seed": args.seed,
    }
    cfg = EmbedTrainConfig.from_dict({k: v for k, v in options.items() if v is not None})
    result = train_source(settings, args.source, args.dataset, cfg, progress=True)
    row = result.source
    options_file = _write_options(row.checkpoint_path, args)
    train = row.metrics["train"]
    from indexer.evaluation import collapse_note

    cos = train.get("mean_cosine")
    print(
        f"{row.name} v{row.version}: {train['steps']} steps on {result.n_pairs} pairs in {train['seconds']:.1f}s, "
        f"loss {train['loss_first']:.3f} -> {train['loss_last']:.3f}, mean cosine between random items "
        f"{'-' if cos is None else format(cos, '.3f')}\ncheckpoint: {row.checkpoint_path}\noptions:    {options_file}"
    )
    note = collapse_note(cos)
    if note:
        print(f"warning: {note}; train longer (--epochs) or see docs/embeddings.md")
    if args.eval:
        from indexer.evaluation import evaluate_source

        _print_table([evaluate_source(settings, args.source, args.dataset, version=row.version)])
    return 0


def _write_options(checkpoint: Any, args: argparse.Namespace) -> Any:
    """The effective options (the --config file merged with the flags) as :data:`OPTIONS_FILE` beside
    the new version's checkpoint, a file ``--config`` accepts again. The registered config (``muse
    embed list --json``) holds every resolved training value; this file holds what was asked for."""
    from pathlib import Path

    from muse_cli.config_files import dumps_toml

    path = Path(checkpoint).parent / OPTIONS_FILE
    path.write_text(dumps_toml(args.effective_config, comment="muse embed train --config FILE: the options of "
                                                             f"{args.source} on {args.dataset}"
                                                             + (f" (from {args.config})" if args.config else "")))
    return path


def _list(args: argparse.Namespace) -> int:
    from indexer.source_registry import check_registry, list_versions
    from muse.settings import load_settings

    settings = load_settings()
    check_registry(settings)
    versions = list_versions(settings, args.source)
    if args.json:
        print(json.dumps([v.__dict__ for v in versions], indent=2, default=str))
        return 0
    if not versions:
        print("no embedding sources yet: `muse embed train --source scl --dataset NAME`")
        return 0
    from indexer.source_registry import dataset_names

    names = dataset_names(settings)
    print(f"{'source':<11} {'ver':>3} {'kind':<8} {'dim':>4} {'model':<12} {'steps':>6} {'seconds':>8}  "
          f"{'dataset':<22} evaluated on")
    for v in versions:
        train = v.metrics.get("train", {})
        # an imported version is its dataset's (numbered per dataset); a trained one was trained on it
        dataset = v.config.get("dataset") or names.get(v.dataset_id) or "-"
        print(
            f"{v.name:<11} {v.version:>3} {v.kind:<8} {v.dim:>4} {(v.config.get('model', '-') if v.kind == 'trained' else '-'):<12} "
            f"{str(train.get('steps', '-')):>6} {str(train.get('seconds', '-')):>8}  {dataset:<22} "
            f"{', '.join(v.metrics.get('eval', {})) or '-'}"
        )
    return 0


def _import(args: argparse.Namespace) -> int:
    from indexer.encode import ensure_imported
    from indexer.source_registry import check_registry
    from muse.settings import load_settings

    settings = load_settings()
    check_registry(settings)
    row = ensure_imported(settings, args.source, args.dataset)
    print(f"{row.name} v{row.version}: {row.metrics.get('n_items_with_vector')} item vectors from {row.checkpoint_path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from indexer.encode import open_dataset
    from indexer.evaluation import evaluate_source, load_eval_data, random_baseline
    from indexer.source_registry import check_registry, list_versions
    from muse.settings import load_settings

    settings = load_settings()
    check_registry(settings)
    dataset = open_dataset(settings, args.dataset)
    sources = args.sources
    if not sources:
        registered = {v.name for v in list_versions(settings)}
        sources = [s for s in ALL_SOURCES if s in registered and s not in IMPORTED]
        sources += [s for s in IMPORTED if dataset.embeddings_path(s) is not None]
    data = load_eval_data(dataset, max_queries=args.max_queries, max_pairs=args.max_pairs)
    rows: list[dict[str, Any]] = []
    for name in tqdm(sources, desc="evaluating", unit="source", disable=args.json):
        rows.append(evaluate_source(settings, name, dataset, data=data))
    rows.append({"source": "random", "version": None, **random_baseline(dataset, data)})
    if args.json:
        print(json.dumps({"dataset": dataset.name, "results": rows, "notes": _notes(rows)}, indent=2))
    else:
        _print_table(rows)
    return 0


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    """Warnings about the rows: collapsed encoders and recalls resting on too few held-out samples."""
    from indexer.evaluation import collapse_note, small_set_notes

    notes: list[str] = []
    for r in rows:
        if r["source"] == "random":
            continue
        note = collapse_note(r.get("mean_cosine"))
        if note:
            notes.append(f"{r['source']}: {note}")
    if rows:  # every source is scored on the same held-out set (the random row, last, has every metric)
        notes += [f"held-out set: {n}" for n in small_set_notes(rows[-1])]
    return notes


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'source':<11} {'ver':>3} " + " ".join(f"{c:>19}" for c in METRIC_COLUMNS)
    print(header)
    for r in rows:
        cells = " ".join(f"{'-' if r.get(c) is None else format(r[c], '.4f'):>19}" for c in METRIC_COLUMNS)
        print(f"{r['source']:<11} {'-' if r['version'] is None else r['version']:>3} {cells}")
    print("q2p = query -> purchased item; i2i = item -> co-occurring item; _tail = long-tail (seen < 5 times); "
          "mean_cosine = between random items (~0 spread out, > 0.9 collapsed)")
    for note in _notes(rows):
        print(f"warning: {note}")


def _models(args: argparse.Namespace) -> int:
    from indexer.encoders import available_models, register_model_configs

    ours = register_model_configs()
    if args.json:
        print(json.dumps({"project": ours, "open_clip": [m for m in available_models() if m not in ours]}, indent=2))
        return 0
    print("project configs: " + ", ".join(ours))
    print("open_clip configs: " + ", ".join(m for m in available_models() if m not in ours))
    return 0
