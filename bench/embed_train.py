"""Training cost of every embedding source with its default options, against its budget.

Generates (or reuses) a simworld under ``--data-dir``, trains each source with the defaults
(``indexer.training.EmbedTrainConfig()``: the step count follows the data, see ``default_max_pairs``) and
prints per source: pairs, steps, wall seconds, seconds per step, the mean cosine between random items
(> 0.9 = collapsed) and the ratio of the wall time to the budget (``tiny``: 60 s, ``small``: 300 s per
source, on 2 CPUs). The load average at the start and the end is printed too: the machine may be shared.

    python -m bench.embed_train --size tiny
    python -m bench.embed_train --size small --sources scl,i2i
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

BUDGET_S = {"tiny": 60.0, "small": 300.0}
SOURCES = ("scl", "i2i", "openclip", "id")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=tuple(BUDGET_S), help="simworld size (default tiny)")
    ap.add_argument("--sources", default=",".join(SOURCES), help="comma-separated (default: all four)")
    ap.add_argument("--data-dir", default=None, help="MUSE_DATA_DIR to use (default: a folder under /tmp)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    data_dir = Path(args.data_dir or f"/tmp/muse-bench-embed-{args.size}")
    os.environ["MUSE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("MUSE_DEVICE", "cpu")
    import torch

    from indexer.training import EmbedTrainConfig, train_source
    from muse import db
    from muse.data.simworld import generate_simworld
    from muse.settings import load_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings()
    db.upgrade(settings)
    name = f"simworld-{args.size}-0"
    if not settings.path("datasets", name, "meta.json").exists():
        generate_simworld(settings, args.size, 0, name)
    budget = BUDGET_S[args.size]
    load_start = os.getloadavg()[0]
    print(f"simworld {args.size}; device {settings.resolve_device()}, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {load_start:.1f} on {os.cpu_count()} CPUs")
    print(f"| source | pairs | steps | wall s | s/step | mean cos | wall / budget ({budget:.0f} s) |")
    print("|---|---|---|---|---|---|---|")
    for source in [s.strip() for s in args.sources.split(",") if s.strip()]:
        t0 = time.perf_counter()
        res = train_source(settings, source, name, EmbedTrainConfig())
        wall = time.perf_counter() - t0
        m = res.source.metrics["train"]
        cos = m.get("mean_cosine")
        print(f"| {source} | {m['n_pairs']:,} | {m['steps']} | {wall:.1f} | {wall / m['steps']:.2f} | "
              f"{'-' if cos is None else format(cos, '.2f')} | {wall / budget:.2f} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
