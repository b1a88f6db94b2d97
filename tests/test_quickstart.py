"""``muse quickstart`` end to end in a subprocess on the embedded deployment, at its smallest size.

The default size's wall time is a bench (`python -m bench.quickstart`), not a test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def _env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "MUSE_DATA_DIR": str(data_dir), "MUSE_DEVICE": "cpu"}
    for var in ("MUSE_DATABASE_URL", "MUSE_MILVUS_URI", "MUSE_BROKER_URL", "MUSE_QUEUE_PREFIX", "MUSE_CONFIG"):
        env.pop(var, None)
    return env


def _muse(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "muse_cli", *args], env=_env(data_dir),
                          capture_output=True, text=True, timeout=900, cwd=data_dir)


def _run(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    return _muse(["quickstart", *args], data_dir)


def _readme_snippet() -> str:
    """The README's Python example (the first ```python block after the walk-through heading)."""
    text = README.read_text()
    start = text.index("```python\n", text.index("## Walk-through")) + len("```python\n")
    return text[start:text.index("```", start)]


def test_quickstart_tiny_end_to_end_then_reused(tmp_path: Path):
    data_dir = tmp_path / "muse-data"
    data_dir.mkdir()
    args = ["--size", "tiny", "--sources", "scl", "--models", "din,muse", "--seeds", "2"]
    res = _run(args, data_dir)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    for stage in ("[1/6] metadata database", "[3/6] embedding sources", "[4/6] backfill scl",
                  "[5/6] retrieval example", "[6/6] rankers"):
        assert stage in out, stage

    # the retrieval example: titles, categories, and cosines that are spread out (not a collapse)
    example = out[out.index("[5/6]"):out.index("[6/6]")]
    rows = re.findall(r"^\s+\d+\s+(-?\d\.\d{4})\s+\d+\s+x\d+\s+(\w+/\w+)\s+\S", example, re.M)
    assert len(rows) >= 3, example
    spread = re.search(r"median (-?\d\.\d+), min (-?\d\.\d+), std (\d\.\d+)", example)
    assert spread is not None, example
    assert float(spread.group(1)) < 0.95 and float(spread.group(3)) > 0.02, example
    assert "collapsed" not in example
    mean_cos = float(re.search(r"mean cosine between random items (-?\d\.\d+)", out).group(1))
    assert mean_cos < 0.9, out

    # the comparison table: a line per model and source with mean +- std, one stored comparison, and its
    # chart, Markdown table and JSON kept under its id
    assert re.search(r"^din \(ta\+simtier\)\s+scl\s+0\.\d{4} \+- 0\.\d{4}", out, re.M), out[-2000:]
    assert re.search(r"^muse \(sa-ta\+simtier\)\s+scl\s+0\.\d{4} \+- 0\.\d{4}", out, re.M), out[-2000:]
    comparison = int(re.search(r"^comparison (\d+) \(stored;", out, re.M).group(1))
    chart = Path(re.search(r"^chart: (\S+)", out, re.M).group(1))
    assert chart.name == f"comparison-{comparison}.png" and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(chart.with_suffix(".json").read_text())
    assert saved["id"] == comparison
    assert {(c["model"], c["source"]) for c in saved["cells"]} == {("din", "scl"), ("muse", "scl")}
    assert all(0.0 < c["metrics"]["gauc"]["mean"] < 1.0 and len(c["runs"]) == 2 for c in saved["cells"])
    markdown = chart.with_suffix(".md").read_text()
    assert markdown.startswith(f"# Comparison {comparison}: quickstart-tiny-0\n") and "\n|---|---|" in markdown
    assert "| din (ta+simtier) | scl |" in markdown and "\n- note: only " in markdown  # a table, then the verdict
    assert "Intrinsic metrics of the sources" in out and "| scl (not evaluated" in out  # as `compare --show` says
    assert "test users; differences between models here are noise" in out  # tiny says it is tiny
    shown = _muse(["compare", "--show", str(comparison)], data_dir).stdout
    assert "| din (ta+simtier) | scl |" in shown and "| muse (sa-ta+simtier) | scl |" in shown
    run = saved["cells"][0]["runs"][0]
    options = _muse(["rank", "show", str(run)], data_dir).stdout
    assert "options (muse quickstart; usable as `muse rank train --config FILE`):" in options, options
    assert 'model = "din"' in options and "threads = " in options and "steps per epoch" in options

    # the other commands on what the quickstart made: the README's snippet on the example it printed
    user, target = (int(x) for x in re.search(r"user (\d+): \d+ behaviours prefetched; target item (\d+)", out).groups())
    first_line = re.search(r"^dataset, user, targets = .*$", _readme_snippet(), re.M).group(0)
    printed = re.search(r"the README's Python snippet for this example: (dataset, user, targets = .*)$", out, re.M)
    assert printed.group(1) == f'dataset, user, targets = "quickstart-tiny-0", {user}, [{target}]'
    snippet = _readme_snippet().replace(first_line, printed.group(1))
    shown = subprocess.run([sys.executable, "-c", snippet], env=_env(data_dir), capture_output=True, text=True,
                           timeout=300, cwd=data_dir)
    assert shown.returncode == 0 and shown.stdout.startswith(f"{target} ["), shown.stdout + shown.stderr
    items, scores = re.match(r"^\d+ (\[[^\]]*\]) (\[[^\]]*\])$", shown.stdout.strip()).groups()
    assert len(set(json.loads(items))) >= 4  # a varied top 5, not the target five times
    assert all(len(str(x).split(".")[-1]) <= 3 for x in json.loads(scores)), scores  # rounded
    unknown = _muse(["retrieve", "search", "--source", "scl", "--dataset", "quickstart-tiny-0", "--user", "999999",
                     "--items", str(target)], data_dir)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: dataset 'quickstart-tiny-0' has no user "
                                                                 "999999"), unknown.stdout + unknown.stderr
    listed = _muse(["backfill", "list"], data_dir)
    assert listed.stdout.splitlines()[0].split() == ["job", "status", "source", "dataset", "created"], listed.stdout
    assert json.loads(_muse(["backfill", "list", "--json"], data_dir).stdout)[0]["status"] == "done"

    # a second run reuses everything: nothing is trained or backfilled again, and no comparison is added
    started = time.perf_counter()
    again = _run(args, data_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing quickstart-tiny-0" in again.stdout and "reusing scl v1" in again.stdout
    assert "already done" in again.stdout and "(run " in again.stdout and "reused)" in again.stdout
    assert "trained scl" not in again.stdout
    assert f"comparison {comparison} (stored before" in again.stdout
    assert [c["id"] for c in json.loads(_muse(["compare", "--list", "--json"], data_dir).stdout)] == [comparison]
    assert time.perf_counter() - started < 0.5 * _stage_seconds(out)
    assert np.isclose(json.loads(chart.with_suffix(".json").read_text())["cells"][0]["metrics"]["gauc"]["mean"],
                      saved["cells"][0]["metrics"]["gauc"]["mean"])


def _stage_seconds(out: str) -> float:
    return sum(float(x) for x in re.findall(r"^\s+\((\d+\.\d) s\)$", out, re.M))


def test_quickstart_rejects_unknown_names_before_running(tmp_path: Path):
    for args, word in ((["--sources", "sclx"], "sclx"), (["--models", "dinx"], "dinx")):
        res = _run(args, tmp_path)
        assert res.returncode == 2, res.stdout + res.stderr
        assert word in res.stderr and "Traceback" not in res.stderr
        assert "[1/6]" not in res.stdout  # nothing ran
