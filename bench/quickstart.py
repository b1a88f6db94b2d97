"""Wall time of ``muse quickstart`` at a size, first run against a second run that reuses everything.

Runs the quickstart twice in a fresh ``MUSE_DATA_DIR`` (embedded: SQLite, Milvus Lite, filesystem
queue), each in its own process as a user would, and prints a table: wall seconds of each run, the
budget (600 s for the standard size on 2 CPUs), wall / budget, and second / first. The stage times and
the comparison table of the first run are printed after it. The load average is printed too: the
machine may be shared.

    python -m bench.quickstart                 # standard size
    python -m bench.quickstart --size tiny
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = {"standard": 600.0, "tiny": 120.0}


def _run(data_dir: Path, size: str, extra: list[str]) -> tuple[float, str]:
    env = {**os.environ, "MUSE_DATA_DIR": str(data_dir)}
    for var in ("MUSE_DATABASE_URL", "MUSE_MILVUS_URI", "MUSE_BROKER_URL", "MUSE_QUEUE_PREFIX", "MUSE_CONFIG"):
        env.pop(var, None)
    started = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "muse_cli", "quickstart", "--size", size, *extra],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if res.returncode:
        sys.exit(f"quickstart failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return wall, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="standard", choices=tuple(BUDGET_S), help="quickstart size (default standard)")
    ap.add_argument("--keep", action="store_true", help="keep the data folder (printed)")
    ap.add_argument("extra", nargs="*", help="more quickstart options, after --, e.g. -- --seeds 2")
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="muse-bench-quickstart-"))
    load = os.getloadavg()[0]
    try:
        first, out = _run(data_dir, args.size, args.extra)
        second, _ = _run(data_dir, args.size, args.extra)
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    stages = re.findall(r"^\[(\d)/6\] (.*)$\n(?:.*\n)*?^\s+\((\d+\.\d) s\)$", out, re.M)
    budget = BUDGET_S[args.size]
    print(f"muse quickstart --size {args.size} {' '.join(args.extra)}; {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("| run | wall s | budget s | wall / budget |")
    print("|---|---|---|---|")
    print(f"| first (fresh data dir) | {first:.0f} | {budget:.0f} | {first / budget:.2f} |")
    print(f"| second (reuses everything) | {second:.1f} | - | {second / first:.3f} of the first |")
    print("\nstages of the first run:")
    for n, title, seconds in stages:
        print(f"  [{n}/6] {title}: {seconds} s")
    table = out[out.index("model "):] if "model " in out else out[-2000:]
    print("\n" + table)
    if args.keep:
        print(f"data kept in {data_dir}")


if __name__ == "__main__":
    main()
