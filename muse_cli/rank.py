"""``muse rank``: train, evaluate, list and score CTR ranker runs; ``muse compare``: the embedding-source
x model matrix."""

from __future__ import annotations

import argparse
import json
from typing import Any

from muse_cli.config_files import add_config_option, parse_set_items
from muse_cli.launch import add_nproc_option, as_rank, launch, launched, wants_launch
from muse_cli.registries import LazyChoices, esu_variants, model_names

#: The names ``--model`` and ``--esu`` accept, read from ``ranker.models`` when first needed.
MODEL_CHOICES = LazyChoices(model_names)
ESU_CHOICES = LazyChoices(esu_variants)
#: ``muse compare``'s defaults, applied after a ``--config`` file is merged (the parser's are None).
COMPARE_SOURCES = ("scl",)
COMPARE_SEEDS = 1


def _csv(raw: str) -> list[str]:
    return [x.strip() for x in raw.split(",") if x.strip()]


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="dataset name (see `muse data list`)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the train split (default 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="impressions per step, over all processes with --nproc or torchrun (default 256, lower on a "
                        "small train split so that an epoch has at least 100 steps: ranker.schedule)")
    p.add_argument("--seed", type=int, default=None, help="seed of weights and shuffle (default 0)")
    p.add_argument("--max-train", type=int, default=None, help="stop each epoch after this many impressions")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many test impressions")
    p.add_argument("--k", type=int, default=None, help="behaviours kept by the GSU (default 50)")
    p.add_argument("--max-history", type=int, default=None, help="newest behaviours kept (default 1000)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; per process with --nproc: the CPUs // N)")
    add_nproc_option(p)
    p.add_argument("--lr", type=float, default=None, help="learning rate of the dense weights (default 2e-4)")
    p.add_argument("--sparse-lr", type=float, default=None,
                   help="learning rate of the embedding tables (default 2e-3)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="set any model-config or train-config field, e.g. --set simtier_init=0.5 "
                        "--set tower=[128,64] (repeatable; values are JSON, else strings); recorded with the run")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="CTR ranker: train, evaluate, list and score runs")
    rsub = p.add_subparsers(dest="rank_command", metavar="ACTION", required=True)

    t = rsub.add_parser("train", help="train a model, evaluate it on the test split and record the run")
    t.add_argument("--model", choices=MODEL_CHOICES, metavar="MODEL",
                   help="model to train (required): %(choices)s")
    t.add_argument("--source", default=None, help="embedding source of the GSU (muse): scl, i2i, openclip, id, ...")
    t.add_argument("--esu", default=None, choices=ESU_CHOICES, metavar="ESU",
                   help="ESU variant: %(choices)s (default: the model's, as the paper sets it up; "
                        "ta = the classic ID-only ESU)")
    _add_train_options(t)
    t.add_argument("--json", action="store_true", help="print the run's metrics as JSON")
    add_config_option(t, "muse rank train", _train, required=("model", "dataset"))

    e = rsub.add_parser("eval", help="re-evaluate a run from its checkpoint: AUC, GAUC, logloss and slices")
    e.add_argument("run", type=int, help="run id (see `muse rank list`)")
    e.add_argument("--split", default="test", choices=("train", "test"), help="split to evaluate (default test)")
    e.add_argument("--limit", type=int, default=None, help="evaluate at most this many impressions")
    e.add_argument("--batch-size", type=int, default=None,
                   help="impressions per evaluation batch (default: the run's own, eval_batch_size)")
    e.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; per process with --nproc: the CPUs // N)")
    add_nproc_option(e)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=_eval)

    ls = rsub.add_parser("list", help="list the recorded runs")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    sh = rsub.add_parser("show", help="one run: its record and the options it was trained with (as a --config file)")
    sh.add_argument("run", type=int, help="run id (see `muse rank list`)")
    sh.add_argument("--json", action="store_true", help="print the whole record as JSON")
    sh.set_defaults(func=_show)

    s = rsub.add_parser("score", help="click probabilities of candidate items for a user (the scoring API)")
    s.add_argument("run", type=int, help="run id (see `muse rank list`)")
    s.add_argument("--user", type=int, required=True, help="user id")
    s.add_argument("--items", type=lambda r: [int(x) for x in _csv(r)], required=True, help="e.g. 1,2,3")
    s.add_argument("--backend", choices=("cache", "milvus"), default="cache", help="retriever backend (muse)")
    s.add_argument("--version", type=int, default=None,
                   help="source version the retriever reads (muse; default: the live one of the run's dataset)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_score)

    c = sub.add_parser("compare", help="the embedding-source x model matrix over seeds: train what is missing, "
                                       "reuse matching runs, store and plot the result")
    c.add_argument("--models", type=_csv, default=None, help="comma-separated (default all)")
    c.add_argument("--sources", type=_csv, default=None,
                   help=f"embedding sources for the models whose GSU or ESU uses one (default {','.join(COMPARE_SOURCES)})")
    c.add_argument("--esu", type=_csv, default=None,
                   help="ESU variants, comma-separated: default (each model's, the paper's set-up) or any "
                        "variant of `muse rank train --esu`; a variant is trained for every model that accepts it")
    c.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds: --seed, --seed + 1, ... (default {COMPARE_SEEDS})")
    c.add_argument("--no-reuse", action="store_true", help="train every run again instead of reusing matching runs")
    c.add_argument("--out", default=None, help="output folder (default $MUSE_DATA_DIR/ranker/compare-DATASET)")
    c.add_argument("--show", type=int, default=None, metavar="ID", help="print stored comparison ID again")
    c.add_argument("--list", action="store_true", help="list the stored comparisons")
    c.add_argument("--json", action="store_true", help="write the comparison as JSON to stdout")
    _add_train_options(c)
    add_config_option(c, "muse compare", _compare)


def parse_settings(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``KEY=VALUE`` strings (:func:`muse_cli.config_files.parse_set_items`) -> (train-config fields,
    model-config fields).

    Raises:
        ConfigurationError: an item without ``=``.
    """
    import dataclasses

    from ranker.train import RankTrainConfig

    train_keys = {f.name for f in dataclasses.fields(RankTrainConfig)}
    values = parse_set_items(items)
    return ({k: v for k, v in values.items() if k in train_keys},
            {k: v for k, v in values.items() if k not in train_keys})


def _train_config(args: argparse.Namespace) -> Any:
    import torch

    from ranker.train import RankTrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    train_values, _ = parse_settings(args.settings)
    return RankTrainConfig.from_dict({"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                                  "max_train": args.max_train, "max_eval": args.max_eval,
                                  "lr_dense": args.lr, "lr_embedding": args.sparse_lr, **train_values})


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    _, model_values = parse_settings(args.settings)
    explicit = {k: v for k, v in {"k": args.k, "max_history": args.max_history}.items() if v is not None}
    return {**model_values, **explicit}


def _num(value: Any, width: int, digits: int = 4) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _print_metrics(metrics: dict[str, Any]) -> None:
    """The metrics table of a run, and in words when it is undertrained (then it is not a result)."""
    from ranker.schedule import undertrained

    print(f"  {'slice':<14} {'n':>8} {'AUC':>7} {'GAUC':>7} {'logloss':>8}")
    for name in ("overall", "long_tail", "long_history"):
        m = metrics.get(name)
        if m:
            print(f"  {name:<14} {m['n']:>8} {_num(m.get('auc'), 7)} {_num(m.get('gauc'), 7)} "
                  f"{_num(m.get('logloss'), 8)}")
    base = metrics.get("base_rate") or {}
    if isinstance(base.get("logloss"), (int, float)):
        print(f"  base rate: click rate {base['ctr']:.4f} on {base['split']}, logloss {base['logloss']:.4f}")
    verdict = undertrained(metrics)
    if verdict:
        print(f"  {verdict}: these metrics are not a result (more steps: a smaller --batch-size or more --epochs)")


def _distributed(args: argparse.Namespace, settings: Any, work: Any, check: Any = None) -> int:
    """Run ``work(dist)`` as the command wants: through the launcher (``--nproc N``; ``check()`` first, so
    that an input error is one sentence, not one per process), as one rank (started by a launcher), or
    in this process (``work(None)``)."""
    if wants_launch(args):
        if check is not None:
            check()
        return launch(args, settings)
    if launched():
        return as_rank(args, settings, work)
    return work(None)


def _train(args: argparse.Namespace) -> int:
    from muse.settings import load_settings

    settings = load_settings()

    def check() -> None:
        from muse.data.format import Dataset
        from ranker.train import train_model_config

        _train_config(args)
        train_model_config(args.model, args.esu, _overrides(args), args.source)
        Dataset.open(settings, args.dataset)

    return _distributed(args, settings, lambda dist: _train_run(args, settings, dist), check)


def _train_run(args: argparse.Namespace, settings: Any, dist: Any) -> int:
    from ranker.train import train

    main = dist is None or dist.is_main
    vectors = _train_vectors(settings, args) if dist is None else dist.in_turn(lambda: _train_vectors(settings, args))
    res = train(settings, args.model, args.dataset, source=args.source, esu=args.esu,
                train_config=_train_config(args), model_overrides=_overrides(args), progress=main,
                vectors=vectors, dist=dist)
    if not main:
        return 0
    _record_options(settings, res.run_id, args)
    if args.json:
        print(json.dumps({"run": res.run_id, **res.metrics}, indent=2, default=str))
        return 0
    tr = res.metrics["train"]
    from ranker.runs import get_run

    over = "" if dist is None else f" per process, over {dist.world} processes ({dist.backend})"

    schedule = get_run(settings, res.run_id).config.get("schedule") or {}
    print(f"run {res.run_id}: {args.model} on {args.dataset}, {tr['samples']} samples in {tr.get('steps')} steps "
          f"(batch {schedule.get('batch_size')}, {schedule.get('chosen')}), {tr['samples_per_s']:.0f} samples/s on "
          f"{tr.get('threads')} thread(s){over}; checkpoint {res.checkpoint}")
    _print_metrics(res.metrics)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from muse.settings import load_settings

    settings = load_settings()

    def check() -> None:
        from ranker.runs import load_run

        load_run(settings, args.run)

    return _distributed(args, settings, lambda dist: _eval_run(args, settings, dist), check)


def _eval_run(args: argparse.Namespace, settings: Any, dist: Any) -> int:
    import torch

    from ranker.evaluate import evaluate_run

    if dist is None and args.threads:
        torch.set_num_threads(args.threads)
    metrics = evaluate_run(settings, args.run, split=args.split, limit=args.limit, batch_size=args.batch_size,
                           vectors_for=_vectors_for(settings, dist), dist=dist)
    if dist is not None and not dist.is_main:
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
        return 0
    print(f"run {args.run} on {args.split}:")
    _print_metrics(metrics)
    return 0


def _list(args: argparse.Namespace) -> int:
    from muse.settings import load_settings
    from ranker.runs import list_runs

    runs = list_runs(load_settings())
    if args.json:
        print(json.dumps([r.__dict__ for r in runs], indent=2, default=str))
        return 0
    if not runs:
        print("no ranker runs yet: `muse rank train --model muse --source scl --dataset NAME`")
        return 0
    from ranker.schedule import undertrained

    print(f"{'run':>4} {'model':<9} {'esu':<14} {'source':<15} {'dataset':<20} {'seed':>4} {'status':<7} "
          f"{'GAUC':>7}  note")
    for r in runs:
        gauc = (r.metrics.get("overall") or {}).get("gauc")
        g = f"{gauc:.4f}" if isinstance(gauc, float) else "-"
        note = "undertrained: not a result" if r.status == "done" and undertrained(r.metrics) else ""
        if r.config.get("provenance"):
            note = (note + "; " if note else "") + "source version unknown"
        print(f"{r.id:>4} {r.model:<9} {r.esu or '-':<14} {_source_label(r):<15} {r.dataset:<20} {r.seed:>4} "
              f"{r.status:<7} {g:>7}  {note}".rstrip())
    return 0


def _source_label(r: Any) -> str:
    """``source vN`` of a run (the version it read), ``source`` when unknown, ``-`` without one."""
    if not r.source:
        return "-"
    return f"{r.source} v{r.source_version}" if r.source_version is not None else r.source


def _show(args: argparse.Namespace) -> int:
    from muse.settings import load_settings
    from muse_cli.config_files import dumps_toml
    from ranker.runs import get_run

    r = get_run(load_settings(), args.run)
    if args.json:
        print(json.dumps(r.__dict__, indent=2, default=str))
        return 0
    print(f"run {r.id}: {r.model} (esu {r.esu or '-'}) on {r.dataset}, source {_source_label(r)}, seed {r.seed}, "
          f"{r.status}; checkpoint {r.checkpoint_path or '-'}")
    if r.config.get("provenance"):
        print(f"  {r.config['provenance']}")
    tr, schedule = r.metrics.get("train") or {}, r.config.get("schedule") or {}
    if schedule:
        print(f"  trained: batch {schedule.get('batch_size')} ({schedule.get('chosen')}), {schedule.get('n_train')} "
              f"train impressions, {schedule.get('steps_per_epoch')} steps per epoch; {tr.get('steps', '-')} steps, "
              f"{tr.get('threads', '-')} torch thread(s)")
    d = r.config.get("distributed")
    if d:
        batch = d.get("local_batch") or {}
        print(f"processes: {d['world_size']} ({d['nodes']} node(s) x {d['procs_per_node']}, {d['backend']}, "
              f"started by {d['launcher']}); global batch {d.get('global_batch')} "
              f"({batch.get('min')}-{batch.get('max')} per process); torch threads per process: "
              f"{', '.join(str(t) for t in d.get('threads') or [])}")
    if r.status == "failed" and r.metrics.get("error"):
        print(f"error: {r.metrics['error']}")
    _print_metrics(r.metrics)
    cli = r.config.get("cli")
    if cli:
        how = (f"{cli.get('command')}{' --config ' + cli['file'] if cli.get('file') else ''}"
               + (", merged with the flags" if cli.get("command") == "muse rank train" else ""))
        print(f"options ({how}; usable as `muse rank train --config FILE`):")
        print(dumps_toml(cli.get("options") or {}), end="")
        return 0
    print("options (not recorded with the run; derived from its stored model and train configs; usable as "
          "`muse rank train --config FILE`):")
    print(dumps_toml(run_options(r)), end="")
    return 0


def _score(args: argparse.Namespace) -> int:
    from muse.settings import load_settings
    from ranker.scoring import Ranker

    settings = load_settings()
    with Ranker.load(settings, args.run, backend=args.backend, version=args.version,
                     vectors_for=_vectors_for(settings)) as ranker:
        probs = ranker.score(args.user, args.items)
        r = ranker.retriever
        used = {} if r is None else {"version": r.version, "collection": r.store.behaviour_collection(r.ref)}
    if args.json:
        print(json.dumps({"user": args.user, "items": args.items, "probs": probs.tolist(), **used}))
        return 0
    if used:
        print(f"GSU on {r.ref} (collection {used['collection']})")
    for item, p in sorted(zip(args.items, probs, strict=True), key=lambda t: -t[1]):
        print(f"{item:>12} {p:.4f}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from muse.errors import ConfigurationError
    from muse.settings import load_settings
    from ranker.compare import get_comparison, list_comparisons, render_table

    settings = load_settings()
    if args.list:
        rows = list_comparisons(settings)
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in [] if args.json else rows:
            print(f"{r['id']:>4} {r['dataset']:<22} models {','.join(r['models'] or [])} sources "
                  f"{','.join(r['sources'] or [])} seeds {r['seeds']} ({r['created_at'][:19]})")
        return 0
    if args.show is not None:
        result = get_comparison(settings, args.show)
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            print(f"comparison {result['id']} ({result['created_at'][:19]})")
            _print_compare_config(result)
            print(render_table(result), end="")
        return 0
    if not args.dataset:
        raise ConfigurationError("muse compare needs --dataset NAME (or --show ID / --list)")
    if args.sources is None:
        args.sources = list(COMPARE_SOURCES)
    if args.seeds is None:
        args.seeds = COMPARE_SEEDS
    if args.seeds < 1:
        raise ConfigurationError(f"--seeds {args.seeds} must be >= 1")

    def check() -> None:
        from muse.data.format import Dataset
        from ranker.compare import plan

        _train_config(args)
        plan(args.models or list(model_names()), args.sources, args.esu)
        Dataset.open(settings, args.dataset)

    return _distributed(args, settings, lambda dist: _compare_run(args, settings, dist), check)


def _compare_run(args: argparse.Namespace, settings: Any, dist: Any) -> int:
    from pathlib import Path

    from ranker.compare import compare, pick_threads

    cfg = _train_config(args)
    main = dist is None or dist.is_main
    vectors_for = _vectors_for(settings, dist)
    if dist is None:
        threads = pick_threads(settings, args.dataset, args.models, args.sources, args.esu, cfg, _overrides(args),
                               requested=args.threads, vectors_for=vectors_for)
        how = "--threads" if args.threads is not None else "the faster of 1 and 2 on a short probe"
    else:
        threads = dist.threads
        how = (f"per process, {dist.world} processes" if args.threads is not None
               else f"per process: the CPUs // {dist.local_world} processes")
    if main and not args.json:
        print(f"torch threads: {threads} ({how})", flush=True)

    def show(row: Any) -> None:
        if not row.reused and main:
            record_started_run(settings, row.run_id, "muse compare", args.config)
        if main and not args.json:
            under = f"  {row.undertrained}" if row.undertrained else ""
            print(f"  {row.label:<26} {row.source or '-':<11} seed {row.seed} run {row.run_id}"
                  f"{' (reused)' if row.reused else ''}: GAUC {row.metrics['overall']['gauc']:.4f}{under}", flush=True)

    res = compare(settings, args.dataset, models=args.models, sources=args.sources, esus=args.esu,
                  train_config=cfg, model_overrides=_overrides(args),
                  out_dir=Path(args.out) if args.out else None, on_row=show, progress=main and not args.json,
                  seeds=[cfg.seed + i for i in range(args.seeds)], reuse=not args.no_reuse, threads=threads,
                  config=_compare_config(args), vectors_for=vectors_for, dist=dist)
    if not main:
        return 0
    config_path = None if res.table_path is None else res.table_path.with_suffix(".toml")
    if config_path is not None and not (res.stored_before and config_path.exists()):  # the stored one's stays
        _write_compare_config(config_path, args)
    if args.json:
        print(json.dumps(res.result, indent=2, default=str))
        return 0
    print(f"comparison {res.comparison_id}"
          + (" (stored before: the same matrix on the same runs; nothing new stored)" if res.stored_before else ""))
    print(res.table, end="")
    print(f"table  {res.table_path}\nplot   {res.plot_path}\nconfig {config_path}")
    return 0


# runs as data: the effective options (--config file merged with the flags) stored with the run ---------


def _options_record(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a run stores of its invocation: the command, the --config file given (if any) and the
    effective options (the file merged with the flags; options at their default are left out)."""
    return {"command": command, "file": args.config, "options": dict(args.effective_config)}


def _record_options(settings: Any, run_id: int | None, args: argparse.Namespace) -> None:
    """Store the effective ``muse rank train`` options in the run's row and as ``run-<id>.toml`` beside
    its checkpoint (``muse rank show RUN`` prints them; the file can be given to ``--config`` again)."""
    if run_id is None:
        return
    from muse_cli.config_files import dumps_toml
    from ranker.runs import record_run_options

    record = _options_record("muse rank train", args)
    text = dumps_toml(record["options"], comment=f"muse rank train --config FILE: the options of run {run_id}")
    record_run_options(settings, run_id, record, text)


def _compare_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a ``muse compare`` matrix as stored with the comparison (``spec.config``)."""
    return _options_record("muse compare", args)


def _print_compare_config(result: dict[str, Any]) -> None:
    cli = (result.get("spec") or {}).get("config")
    if cli:
        from muse_cli.config_files import dumps_toml

        print(f"options ({cli.get('command')}{' --config ' + cli['file'] if cli.get('file') else ''}, "
              "merged with the flags; usable as --config FILE):")
        print(dumps_toml(cli.get("options") or {}))


def _write_compare_config(path: Any, args: argparse.Namespace) -> Any:
    """``comparison-<id>.toml`` beside ``comparison-<id>.md``: the matrix, to give to ``muse compare
    --config`` again."""
    from muse_cli.config_files import dumps_toml

    path.write_text(dumps_toml(args.effective_config, comment="muse compare --config FILE: this comparison's matrix"))
    return path


#: ``muse rank train`` options named after a train-config field (the others go under [set]).
_TRAIN_FLAGS = {"epochs": "epochs", "max_train": "max_train", "max_eval": "max_eval", "lr_dense": "lr",
                "lr_embedding": "sparse_lr", "seed": "seed"}
#: ... and after a model-config field.
_MODEL_FLAGS = {"k": "k", "max_history": "max_history"}


def run_options(info: Any) -> dict[str, Any]:
    """The ``muse rank train`` options (as ``--config`` keys) that train run ``info`` again, derived
    from its stored model and train configs: fields at their defaults are left out, a batch size
    chosen by the schedule's rule too (the rule chooses it again)."""
    import dataclasses

    from ranker.models import make_config
    from ranker.train import RankTrainConfig

    out: dict[str, Any] = {"model": info.model, "dataset": info.dataset}
    if info.source:
        out["source"] = info.source
    model_cfg, train_cfg = info.config.get("model") or {}, info.config.get("train") or {}
    default_model = make_config(info.model, esu=info.esu).to_dict() if info.esu else make_config(info.model).to_dict()
    if info.esu and info.esu != make_config(info.model).esu:
        out["esu"] = info.esu
    settings: dict[str, Any] = {}
    defaults = dataclasses.asdict(RankTrainConfig())
    for key, value in train_cfg.items():
        if key == "batch_size":
            if (info.config.get("schedule") or {}).get("chosen", "given") == "given" and value is not None:
                out["batch_size"] = value
        elif value != defaults.get(key) and value is not None:
            if key in _TRAIN_FLAGS:
                out[_TRAIN_FLAGS[key]] = value
            else:
                settings[key] = value
    for key, value in model_cfg.items():
        default = default_model.get(key)
        if key == "esu" or _plain(value) == _plain(default):
            continue
        if key in _MODEL_FLAGS:
            out[_MODEL_FLAGS[key]] = value
        else:
            settings[key] = value
    threads = (info.metrics.get("train") or {}).get("threads")
    if threads:
        out["threads"] = threads
    if settings:
        out["set"] = settings
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def record_started_run(settings: Any, run_id: int | None, command: str, config_file: str | None = None) -> None:
    """Store with a run that ``command`` (``muse compare``, ``muse quickstart``) trained the options that
    train it again with ``muse rank train`` (:func:`run_options`): in its row and as ``run-<id>.toml``,
    as ``muse rank train`` stores its own (``muse rank show RUN`` prints them)."""
    if run_id is None:
        return
    from muse_cli.config_files import dumps_toml
    from ranker.runs import get_run, record_run_options

    options = run_options(get_run(settings, run_id))
    text = dumps_toml(options, comment=f"muse rank train --config FILE: run {run_id}, trained by {command}")
    record_run_options(settings, run_id, {"command": command, "file": config_file, "options": options}, text)


def _vectors_for(settings: Any, dist: Any = None) -> Any:
    """``vectors_for(source, dataset)`` for the ranker: the embedding stage's one function for the
    item vectors of a (dataset, source, version), the newest version; each (source, dataset) is read
    once per command (the thread probe and the comparison share the table). In a distributed run the
    ranks read it in turn (``Dist.in_turn``): the first one writes the table, the others map it."""
    import functools

    from indexer.item_vectors import item_vectors

    load = functools.partial(item_vectors, settings)
    if dist is not None:
        base = load

        def load(source: str, dataset: str) -> Any:
            return dist.in_turn(lambda: base(source, dataset))

    return functools.cache(load)


def _train_vectors(settings: Any, args: argparse.Namespace) -> Any:
    """The item vectors ``muse rank train`` hands the ranker: only when the model reads them."""
    from ranker.train import model_needs_vectors

    if args.source is None or not model_needs_vectors(args.model, args.esu, _overrides(args)):
        return None
    return _vectors_for(settings)(args.source, args.dataset)
