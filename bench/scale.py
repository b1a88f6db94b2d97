"""Every stage at fractions of the open Taobao-MM, each in a fresh process: wall time, throughput and
peak RSS, a least-squares line per stage and the extrapolation to the full set (issue 20).

For each fraction ``f`` (``--fractions``, default 0.001, 0.003, 0.01) the bench writes raw
Taobao-MM files of ``9M·f`` users, ``35M·f`` items and ``1B·f`` samples with its own generator
(:mod:`bench.scale_raw`, bounded memory), then runs, each as its own child process through the
public command line with ``MUSE_DATA_DIR`` etc. set for that fraction:

======== ==================================================================================
scan     a bare pyarrow scan of the raw files (``iter_batches`` over every file): the baseline
         the import is held against (goal: import <= 3x the scan). The scan and the import run
         ``--repeats`` times (default 3), alternating, and each reports its fastest run: a sub-second
         scan's wall time varies up to 2x between runs on this machine
import   ``muse data taobao-mm RAW``, registering the dataset as the full set does: with no row per
         item or user in the database (``MUSE_REGISTER_MAX_ROWS=0``: the full set's 35M items and 9M
         users are above the default 200,000; below it a fraction would insert up to 200,000 rows a
         table, 0.25-0.8 s at the default fractions, a cost the full set does not have)
train    ``muse rank train --model muse --source scl-taobao --max-train N``: the ranker's data
         set-up plus a fixed number of training steps (``--train-samples``, default 100 steps of
         256); throughput = the training loop's samples/s as the run reports it. It trains as the
         full set trains: the item ID table with sparse gradients (SparseAdam), as the model gives
         a table of 1M rows or more (``--set sparse_min_rows=N``, N the fraction's item table;
         below 1M rows the default is dense Adam, about twice the bytes an item, which would put
         on the line a cost the full set does not have)
eval     the whole test split with a fast model (``--eval-model``, default ``din --esu ta``):
         ``muse rank train --max-train 1024`` without ``--max-eval``, i.e. the data set-up, four
         steps and the evaluation ``muse rank eval`` runs, in one process (MUSE itself evaluates
         at about a quarter of DIN's speed on 2 CPUs: 2M test impressions at f = 0.01); its item
         table trains in the full set's gradient regime, as in the train stage
backfill ``muse backfill --source scl-taobao --users N``: every item vector and the behaviours of
         the first ``--backfill-users`` users (default 1,000) into a Milvus server (one the bench
         starts on free ports, or ``--milvus-uri``), through the queue and its worker process
serve    ``muse serve --dtype int8``: start-up until the gRPC health check answers SERVING (the item
         table, in the shipped SCL's int8 by default; ``--serve-dtype float32`` for 4x the bytes)
prefetch a client process prefetching the backfilled users cold through ``RemoteRetriever``
         (``--prefetch-users``, default 1,000): users/s
======== ==================================================================================

**Peak RSS** is the child's own: each command runs under a small wrapper process
(:mod:`bench.stage_wrapper`, standard library only) whose ``os.wait4`` returns the command's
``ru_maxrss``, covering the descendants it waited for (the backfill's embedded worker). (Spawned
by this process directly, a child's ``ru_maxrss`` would start from this process's own RSS, which
Linux carries over ``exec``.) The server runs on through the prefetch, so its two figures are read
from the kernel's high-water mark ``VmHWM`` in ``/proc/PID/status``: once healthy (serve) and after
the prefetch (prefetch: the server holds the histories; the client's own peak is in the JSON);
the wrapper's figure at the server's exit is kept as a check.

Then, per stage, least-squares lines ``y = a + b·f`` of peak RSS and wall time over the fractions,
their values at ``f = 1``, a verdict of each peak against ``--budget-gb`` (default 16), and the goals
of issue 20 as lines of the table: peak RSS at f = 1 within the budget for every stage; for the
import and training, peak RSS at the largest fraction <= 1.5x that at the smallest; training
samples/s at the largest fraction >= 0.8x that at the smallest; the import <= 3x the bare scan.
Stages with fixed work (train, backfill, prefetch) extrapolate the cost of that fixed work.

    python -m bench.scale                                   # the default run (<= 30 min on 2 CPUs)
    python -m bench.scale --fractions 0.0001,0.0002 --json  # a quick try
    python -m bench.scale --work /tmp/scale --keep          # keep (and reuse) raw files and data sets
    python -m bench.scale render report.json                # a saved --json report as tables again

Needs the ``milvus`` package (the embedded 2.3 server of the test extra) unless ``--milvus-uri``
is given; without either, ``--stages import,train,eval`` runs the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.scale_raw import FULL_ITEMS, FULL_USERS, RawSpec, existing_raw, scan_raw

REPO = Path(__file__).resolve().parent.parent
STAGES = ("scan", "import", "train", "eval", "backfill", "serve", "prefetch")
#: What each stage needs to have run first (within one fraction).
NEEDS = {"train": ("import",), "eval": ("import",), "backfill": ("import",), "serve": ("backfill",),
         "prefetch": ("serve",)}
#: Stages whose work is fixed, not proportional to f: their extrapolated wall is that fixed work's.
FIXED_WORK = ("train", "backfill", "prefetch")
SOURCE = "scl-taobao"  # the vectors Taobao-MM ships (int8 SCL)
DEFAULT_FRACTIONS = (0.001, 0.003, 0.01)
GB = 1e9
#: issue 20's goals
IMPORT_OVER_SCAN_MAX = 3.0
GROWTH_MAX = 1.5  # peak RSS at the largest fraction / at the smallest (import, train)
TRAIN_SPEED_MIN = 0.8  # training samples/s at the largest fraction / at the smallest


@dataclass
class StageResult:
    """One stage at one fraction."""

    stage: str
    fraction: float
    ok: bool
    wall_s: float = 0.0
    peak_rss: int = 0  # bytes
    work: float = 0.0  # units of work done (see ``unit``)
    unit: str = ""
    throughput: float = 0.0  # work per second (the stage's own figure where it reports one)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- child processes -----------------------------------------------------------------------------------
def _status_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` field in kB (``VmHWM``: peak RSS so far, ``VmRSS``: now); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Child:
    """A command run through :mod:`bench.stage_wrapper` in its own session (so its own children stop
    with it), stdout and stderr to files: its exit code, wall time and peak RSS are the wrapper's
    ``os.wait4`` figures for it (see the wrapper's docstring for why not this process's)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_dir: Path, name: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self.result_path = log_dir / f"{name}.rusage.json"
        for p in (self.result_path, Path(f"{self.result_path}.pid")):
            p.unlink(missing_ok=True)
        self.argv = argv
        self.started = time.perf_counter()
        wrapper = [sys.executable, "-S", str(REPO / "bench" / "stage_wrapper.py"), str(self.result_path), "--", *argv]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(wrapper, env=env, cwd=REPO, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.code: int | None = None
        self.maxrss = 0  # bytes
        self.wall_s = 0.0
        self.cpu_s = 0.0  # user + system seconds (a loaded machine stretches wall time, not this)
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The command's own PID (not the wrapper's), once it runs."""
        if self._pid is None:
            try:
                self._pid = int(Path(f"{self.result_path}.pid").read_text())
            except (OSError, ValueError):
                return None
        return self._pid

    def poll(self) -> bool:
        """True once the command (and its wrapper) have exited; then ``code``, ``maxrss`` and ``wall_s`` are set."""
        if self.code is not None:
            return True
        if self.proc.poll() is None:
            return False
        try:
            res = json.loads(self.result_path.read_text())
            self.code, self.maxrss, self.wall_s = int(res["code"]), int(res["maxrss"]), float(res["wall_s"])
            self.cpu_s = float(res.get("cpu_s", 0.0))
        except (OSError, ValueError, KeyError):  # the wrapper itself was killed
            self.code, self.wall_s = self.proc.returncode or -1, time.perf_counter() - self.started
        return True

    def wait(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s``; stop the command's process group after that. Returns the exit code."""
        deadline = time.perf_counter() + timeout_s
        while not self.poll():
            if time.perf_counter() > deadline:
                self.stop()
                break
            time.sleep(0.05)
        assert self.code is not None
        return self.code

    def stop(self, grace_s: float = 15.0) -> int:
        """SIGTERM to the process group (the wrapper's session), SIGKILL after ``grace_s``."""
        if not self.poll():
            self._signal(signal.SIGTERM)
            deadline = time.perf_counter() + grace_s
            while not self.poll() and time.perf_counter() < deadline:
                time.sleep(0.05)
            if not self.poll():
                self._signal(signal.SIGKILL)
                self.proc.wait()
                self.poll()
        assert self.code is not None
        return self.code

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group the wrapper leads (start_new_session): only ours
        except ProcessLookupError:
            pass

    def hwm(self) -> int:
        """The running command's peak RSS so far (bytes), from the kernel's ``VmHWM``."""
        pid = self.pid
        return 0 if pid is None else _status_kb(pid, "VmHWM") * 1024

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        text = (self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")).splitlines()
        return "\n".join(x[-300:] for x in text[-lines:])


def run_child(argv: list[str], env: dict[str, str], log_dir: Path, name: str,
              timeout_s: float) -> tuple[Child, float]:
    """Run ``argv`` to the end (or ``timeout_s``); returns the reaped child and its wall time."""
    child = Child(argv, env, log_dir, name)
    child.wait(timeout_s)
    return child, child.wall_s


def _json_out(child: Child) -> Any:
    """The JSON document a ``--json`` command printed on stdout."""
    text = child.stdout()
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError(f"no JSON in the output of {' '.join(child.argv)}")
    return json.loads(text[start:])


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel reports free now."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# -- a Milvus 2.3 server of the bench's own -------------------------------------------------------------
_MILVUS_PORT_KEYS = ("proxy_port", "proxy_internal_port", "root_coord_port", "query_coord_port", "query_node_port",
                     "index_coord_port", "index_node_port", "data_coord_port", "data_node_port")


class MilvusServer:
    """``milvus run standalone`` from the ``milvus`` package on free ports (every listener, the
    embedded etcd's and the metrics port included, so it runs beside any other Milvus), data under
    ``data_dir``; stopped by its PID only."""

    def __init__(self, data_dir: Path, start_timeout_s: float = 300.0) -> None:
        self.data_dir = data_dir.resolve()
        self.start_timeout_s = start_timeout_s
        ports = free_ports(len(_MILVUS_PORT_KEYS) + 3)
        self.ports = dict(zip(_MILVUS_PORT_KEYS, ports))
        self.etcd_client, self.etcd_peer, self.metrics_port = ports[len(_MILVUS_PORT_KEYS):]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy_port']}"

    def start(self) -> MilvusServer:
        import milvus  # the embedded Milvus 2.3 server (the test extra)

        config = milvus.MilvusServerConfig(data_dir=str(self.data_dir))
        config.resolve_storage()
        for key, port in self.ports.items():
            config.set(key, port)
        config.set("etcd_port", self.etcd_client)
        config.resolve()
        config.write_config()
        config.cleanup_listen_ports()
        milvus._initialize_data_files(str(self.data_dir))
        client, peer = f"http://127.0.0.1:{self.etcd_client}", f"http://127.0.0.1:{self.etcd_peer}"
        etcd = self.data_dir / "configs" / "embed-etcd.yaml"
        etcd.write_text(f"listen-client-urls: {client}\nadvertise-client-urls: {client}\nlisten-peer-urls: {peer}\n"
                        f"initial-advertise-peer-urls: {peer}\ninitial-cluster: default={peer}\n")
        exe = self.data_dir / "bin" / "milvus"
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.metrics_port),
               "MILVUS_RUN_DIR": str(self.data_dir / "run"), "ETCD_USE_EMBED": "true",
               "ETCD_CONFIG_PATH": str(etcd), "LD_LIBRARY_PATH": f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        self.log_path = self.data_dir / "server.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "run", "standalone"], cwd=self.data_dir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus exited during start-up (code {self.proc.returncode}); log {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2) as r:
                    if b"OK" in r.read() and _port_open(self.ports["proxy_port"]):
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"milvus did not become healthy within {self.start_timeout_s:.0f} s; log {self.log_path}")

    @property
    def rss(self) -> int:
        """The server's resident bytes now."""
        return _status_kb(self.proc.pid, "VmRSS") * 1024 if self.proc is not None else 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# -- one fraction ---------------------------------------------------------------------------------------
@dataclass
class Options:
    """What the run does (from the command line)."""

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    stages: tuple[str, ...] = STAGES
    budget_gb: float = 16.0
    seed: int = 0
    train_model: str = "muse"
    train_samples: int = 25_600
    batch_size: int = 256
    eval_model: str = "din"
    eval_esu: str | None = "ta"
    eval_train_samples: int = 1_024  # the eval model's training before it evaluates
    backfill_users: int = 1_000
    backfill_chunk_size: int = 4_096  # items per backfill chunk (the CLI's default is 512)
    keep: bool = False  # keep each fraction's Milvus collections (else dropped after its last stage)
    prefetch_users: int = 1_000
    serve_dtype: str = "int8"  # the GSU table in the shipped SCL's own dtype, as docs/scale.md serves the full set
    device: str = "cpu"
    sequence_url: str = "file"
    milvus_uri: str | None = None
    stage_timeout_s: float = 1_800.0
    repeats: int = 3  # runs of the scan and of the import (alternating); each reports its fastest


def _dataset_name(fraction: float) -> str:
    return "scale-" + f"{fraction:g}".replace("e-0", "e-")


def muse_env(data_dir: Path, opts: Options, milvus_uri: str | None, prefix: str) -> dict[str, str]:
    """The environment of every child of one fraction: this process's, without the caller's
    ``MUSE_*`` variables (``MUSE_MILVUS_TOKEN`` aside, for ``--milvus-uri``), plus the fraction's own
    settings (embedded metadata and broker under its data folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSE_") or k == "MUSE_MILVUS_TOKEN"}
    env.update(MUSE_DATA_DIR=str(data_dir), MUSE_DEVICE=opts.device, MUSE_SEQUENCE_URL=opts.sequence_url,
               MUSE_MILVUS_PREFIX=prefix, MUSE_REGISTER_MAX_ROWS=str(full_set_rows_registered()), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if milvus_uri:
        env["MUSE_MILVUS_URI"] = milvus_uri
    return env


def full_set_rows_registered() -> int:
    """The ``MUSE_REGISTER_MAX_ROWS`` under which a fraction's import registers metadata as the full
    set's does: the full set's 35M items and 9M users are each above the default (200,000), so it
    registers no row per item or user; a fraction below the default would insert up to 200,000 rows
    a table, a cost on the line (0.25-0.8 s at f <= 0.01) that the full set does not have."""
    from muse.settings import Settings

    default = Settings.register_max_rows
    return 0 if min(FULL_ITEMS, FULL_USERS) > default else default


def full_set_regime(n_items: int) -> int:
    """The ``sparse_min_rows`` under which a fraction's item table (``n_items`` + padding) trains as the
    full set's does: sparse when the full set's table reaches the model's default threshold."""
    from ranker.models.config import ModelConfig

    default = ModelConfig.sparse_min_rows
    return min(default, n_items + 1) if FULL_ITEMS + 1 >= default else default


def train_argv(opts: Options, name: str, n_items: int) -> list[str]:
    """The train stage's command: the ranker's set-up and ``train_samples`` samples of the MUSE model,
    the item table in the full set's gradient regime (:func:`full_set_regime`)."""
    return _muse("rank", "train", "--model", opts.train_model, "--source", SOURCE, "--dataset", name,
                 "--max-train", str(opts.train_samples), "--max-eval", str(opts.batch_size),
                 "--batch-size", str(opts.batch_size), "--seed", str(opts.seed), "--json",
                 "--set", f"sparse_min_rows={full_set_regime(n_items)}")


def eval_argv(opts: Options, name: str, n_items: int) -> list[str]:
    """The eval stage's command: the set-up, a few steps of the fast model (in the full set's gradient
    regime, as the train stage) and the whole test split (no ``--max-eval``)."""
    return _muse("rank", "train", "--model", opts.eval_model, "--dataset", name, "--source", SOURCE,
                 "--max-train", str(opts.eval_train_samples), "--batch-size", str(opts.batch_size),
                 "--seed", str(opts.seed), "--json", *(["--esu", opts.eval_esu] if opts.eval_esu else []),
                 "--set", f"sparse_min_rows={full_set_regime(n_items)}")


def _muse(*args: str) -> list[str]:
    return [sys.executable, "-m", "muse_cli", *args]


def _failed(stage: str, f: float, child: Child, wall: float) -> StageResult:
    return StageResult(stage, f, False, wall, child.maxrss, note=f"exit {child.code}",
                       extra={"log_tail": child.tail(), "argv": child.argv, "cpu_s": child.cpu_s})


def _health_serving(address: str, timeout_s: float = 1.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def run_fraction(f: float, opts: Options, work: Path, milvus: Any, prefix: str,
                 progress: Any = print) -> list[StageResult]:
    """Generate (or reuse) the raw files of fraction ``f`` and run the selected stages on them."""
    results: list[StageResult] = []
    fdir = work / f"f-{f:g}"
    raw, data, logs = fdir / "raw", fdir / "data", fdir / "logs"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    name = _dataset_name(f)
    milvus_uri = opts.milvus_uri or (milvus.uri if milvus is not None else None)
    env = muse_env(data, opts, milvus_uri, prefix)
    timeout = opts.stage_timeout_s
    done: set[str] = set()

    def record(res: StageResult, child: Child | None = None) -> StageResult:
        if child is not None:
            res.extra["cpu_s"] = child.cpu_s
        results.append(res)
        if res.ok:
            done.add(res.stage)
        progress(f"  f={f:g} {res.stage:<9} {'ok' if res.ok else 'FAILED'} {res.wall_s:8.1f} s "
                 f"{res.peak_rss / GB:6.2f} GB  {res.note}")
        if not res.ok and res.extra.get("log_tail"):
            progress("    " + res.extra["log_tail"].replace("\n", "\n    "))
        return res

    def ready(stage: str) -> bool:
        missing = [s for s in NEEDS.get(stage, ()) if s not in done]
        if stage in opts.stages and missing:
            record(StageResult(stage, f, False, note=f"skipped: {', '.join(missing)} did not run"))
        return stage in opts.stages and not missing

    # generate (the bench's own input; measured like a stage, not part of the goals) --------------------
    spec = RawSpec.at(f, opts.seed)
    info = existing_raw(raw, spec)
    if info is None:
        child, wall = run_child([sys.executable, "-m", "bench.scale_raw", "--fraction", repr(f), "--out", str(raw),
                                 "--seed", str(opts.seed)], env, logs, "generate", timeout)
        if child.code != 0:
            record(_failed("generate", f, child, wall))
            return results
        info = _json_out(child)
        gen = StageResult("generate", f, True, wall, child.maxrss, extra={"cpu_s": child.cpu_s})
    else:
        gen = StageResult("generate", f, True, info["seconds"], 0, note="reused")
    raw_bytes = sum(info["bytes"].values())
    n_samples = info["rows"]["train_samples"] + info["rows"]["test_samples"]
    gen.work, gen.unit = raw_bytes / 1e6, "MB"
    gen.throughput = gen.work / max(gen.wall_s, 1e-9)
    gen.note = (gen.note + "; " if gen.note else "") + (
        f"{spec.n_users:,} users, {spec.n_items:,} items, {n_samples:,} samples, {raw_bytes / 1e6:,.0f} MB")
    gen.extra.update(rows=info["rows"], bytes=info["bytes"])
    record(gen)

    # the scan and the import run ``--repeats`` times, alternating, so that both see the same spells of
    # the machine's noise; each reports its fastest run (and its largest peak RSS)
    scans: list[tuple[Child, float, Any]] = []
    imports: list[tuple[Child, float]] = []
    failed: set[str] = set()
    want_import = ready("import")
    if want_import:
        child, wall = run_child(_muse("db", "upgrade"), env, logs, "db-upgrade", timeout)
        if child.code != 0:
            record(_failed("import", f, child, wall))
            want_import = False
    for _ in range(opts.repeats):
        if "scan" in opts.stages and "scan" not in failed:
            child, wall = run_child([sys.executable, "-m", "bench.scale", "scan", str(raw)], env, logs, "scan", timeout)
            if child.code != 0:
                record(_failed("scan", f, child, wall))
                failed.add("scan")
            else:
                scans.append((child, wall, _json_out(child)))
        if want_import and "import" not in failed:
            child, wall = run_child(_muse("data", "taobao-mm", str(raw), "--name", name), env, logs, "import", timeout)
            if child.code != 0:
                record(_failed("import", f, child, wall))
                failed.add("import")
            else:
                imports.append((child, wall))
    best_note = f"; best of {opts.repeats}" if opts.repeats > 1 else ""
    if scans and "scan" not in failed:
        child, wall, out = min(scans, key=lambda c: c[1])
        record(StageResult("scan", f, True, wall, max(c.maxrss for c, _, _ in scans), raw_bytes / 1e6, "MB",
                           raw_bytes / 1e6 / max(out["seconds"], 1e-9),
                           f"{out['rows']:,} rows in {out['seconds']:.1f} s of iter_batches{best_note}",
                           {**out, "walls": [w for _, w, _ in scans]}), child)
    if imports and "import" not in failed:
        child, wall = min(imports, key=lambda c: c[1])
        scan = next((r for r in results if r.stage == "scan" and r.ok), None)
        ratio = wall / scan.wall_s if scan is not None else None
        note = f"{n_samples / wall:,.0f} samples/s" + (f"; {ratio:.1f}x the bare scan" if ratio else "") + best_note
        record(StageResult("import", f, True, wall, max(c.maxrss for c, _ in imports), raw_bytes / 1e6, "MB",
                           raw_bytes / 1e6 / wall, note,
                           {"over_scan": ratio, "samples": n_samples, "walls": [w for _, w in imports]}), child)

    train_run = None
    if ready("train"):
        child, wall = run_child(train_argv(opts, name, spec.n_items), env, logs, "train", timeout)
        if child.code != 0:
            record(_failed("train", f, child, wall))
        else:
            out = _json_out(child)
            tr = out["train"]
            train_run = out["run"]
            record(StageResult("train", f, True, wall, child.maxrss, tr["samples"], "samples", tr["samples_per_s"],
                               f"{opts.train_model}: {tr['samples']:,} samples, {tr['seconds']:.1f} s in the loop, "
                               f"{wall - tr['seconds']:.1f} s set-up and the rest", {"run": train_run, **tr}), child)

    if ready("eval"):
        # One process: the data set-up, a few training steps of the fast model and the whole test
        # split (no --max-eval), the same evaluate() as ``muse rank eval`` without a second set-up.
        child, wall = run_child(eval_argv(opts, name, spec.n_items), env, logs, "eval", timeout)
        if child.code != 0:
            record(_failed("eval", f, child, wall))
        else:
            out = _json_out(child)
            m = out["overall"]
            label = opts.eval_model + (f" --esu {opts.eval_esu}" if opts.eval_esu else "")
            record(StageResult("eval", f, True, wall, child.maxrss, m["n"], "impressions", m["n"] / wall,
                               f"{label}: set-up, {out['train']['samples']:,} train samples and all {m['n']:,} "
                               f"test impressions (AUC {m['auc']:.3f}, GAUC {m['gauc']:.3f})",
                               {"run": out["run"], **m, "train_loop_s": out["train"]["seconds"]}), child)

    if ready("backfill"):
        if milvus_uri is None:
            record(StageResult("backfill", f, False, note="skipped: no Milvus server (--milvus-uri, or the milvus package)"))
        else:
            argv = _muse("backfill", "--source", SOURCE, "--dataset", name, "--users", str(opts.backfill_users),
                         "--chunk-size", str(opts.backfill_chunk_size))
            child, wall = run_child(argv, env, logs, "backfill", timeout)
            status = None
            if child.code == 0:
                st, _ = run_child(_muse("backfill", "list", "--json"), env, logs, "backfill-list", 120)
                job = _json_out(st)[0]["job_id"]
                st, _ = run_child(_muse("backfill", "status", str(job), "--json"), env, logs, "backfill-status", 120)
                status = _json_out(st)
            if status is None or status.get("status") != "done":
                record(_failed("backfill", f, child, wall))
            else:
                rows = status["items_written"] + status["behaviours_written"]
                extra = {k: status.get(k) for k in ("items_written", "behaviours_written", "behaviours_skipped",
                                                    "items_per_s", "behaviours_per_s", "users_total")}
                if milvus is not None:
                    extra["milvus_rss"] = milvus.rss
                record(StageResult("backfill", f, True, wall, child.maxrss, rows, "rows", rows / wall,
                                   f"{status['items_written']:,} items ({status['items_per_s'] or 0:,.0f}/s) + "
                                   f"{status['behaviours_written']:,} behaviours of {status['users_total']:,} users "
                                   f"({status['behaviours_per_s'] or 0:,.0f}/s)", extra), child)

    if ready("serve"):
        port = free_ports(1)[0]
        address = f"127.0.0.1:{port}"
        server = Child(_muse("serve", "--dataset", name, "--source", SOURCE, "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "-1", "--dtype", opts.serve_dtype), env, logs, "serve")
        try:
            healthy = False
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline and not server.poll():
                if _health_serving(address):
                    healthy = True
                    break
                time.sleep(0.1)
            wall = time.perf_counter() - server.started
            if not healthy:
                server.stop()
                record(_failed("serve", f, server, wall))
            else:
                hwm = server.hwm()
                rss_before = _status_kb(server.pid, "VmRSS") * 1024 if server.pid else 0
                n_items = info["rows"]["scl_embedding_int8_p90"]
                record(StageResult("serve", f, True, wall, hwm, n_items, "items", n_items / wall,
                                   f"healthy after {wall:.1f} s; {opts.serve_dtype} item table of {n_items:,} vectors"))
                if ready("prefetch"):
                    argv = [sys.executable, "-m", "bench.scale", "prefetch-client", "--address", address,
                            "--dataset", name, "--users", str(opts.prefetch_users)]
                    client, cwall = run_child(argv, env, logs, "prefetch", timeout)
                    if client.code != 0:
                        record(_failed("prefetch", f, client, cwall))
                    else:
                        out = _json_out(client)
                        peak = server.hwm()
                        rss_after = _status_kb(server.pid, "VmRSS") * 1024 if server.pid else 0
                        per_user = out["cache_bytes"] / max(out["cache_entries"], 1)  # the cache's own count
                        record(StageResult("prefetch", f, True, out["seconds"], peak, out["users"], "users",
                                           out["users"] / max(out["seconds"], 1e-9),
                                           f"{out['users']:,} users, {out['behaviours']:,} behaviours cold in "
                                           f"{out['seconds']:.2f} s; cache {per_user / 1e3:,.1f} kB a user",
                                           {**out, "client_rss": client.maxrss, "client_wall_s": cwall,
                                            "cache_bytes_per_user": per_user,
                                            "server_rss_growth": rss_after - rss_before}))
        finally:
            server.stop()
        for r in results:  # the server's peak over its whole life, from the wrapper, as a check
            if r.stage in ("serve", "prefetch") and r.ok:
                r.extra["server_maxrss_at_exit"] = server.maxrss
                r.extra["server_cpu_s"] = server.cpu_s
    return results


def prefetch_client(address: str, dataset: str, n_users: int) -> dict[str, Any]:
    """Prefetch the dataset's first ``n_users`` users (the backfilled slice) through a running
    ``muse serve`` and wait for them: users, behaviours loaded, seconds."""
    from muse.data.format import Dataset
    from muse.settings import load_settings
    from retriever.remote import RemoteRetriever

    ds = Dataset.open(load_settings(), dataset)
    users = [int(u) for b in ds.iter_histories(1024, 0, n_users, columns=["user_id"])
             for u in b.column("user_id").to_numpy()]
    with RemoteRetriever(address, prefetch_timeout_s=600.0) as remote:
        t0 = time.perf_counter()
        lengths = remote.prefetch(users).result()
        seconds = time.perf_counter() - t0
        stats = remote.stats()
    return {"users": len(users), "behaviours": int(sum(lengths.values())),
            "users_with_history": int(sum(1 for n in lengths.values() if n)), "seconds": seconds,
            "cache_entries": int(stats.entries), "cache_bytes": int(stats.bytes)}


# -- fits and goals --------------------------------------------------------------------------------------
def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares ``y = a + b·x`` (None with fewer than two distinct x)."""
    if len(set(xs)) < 2:
        return None
    b, a = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


def fits(results: list[StageResult]) -> dict[str, dict[str, Any]]:
    """Per stage: the lines of peak RSS (bytes) and wall time (s) over f and their values at f = 1.

    A negative slope means no growth was measured (noise on a flat cost): the value at f = 1 is
    then the largest one measured, never below it (``no_growth`` says so)."""
    out = {}
    for stage in ("generate", *STAGES):
        rows = [r for r in results if r.stage == stage and r.ok and not (stage == "generate" and r.note.startswith("reused"))]
        xs = [r.fraction for r in rows]
        entry: dict[str, Any] = {"fractions": xs}
        for key in ("peak_rss", "wall_s"):
            ys = [float(getattr(r, key)) for r in rows]
            line = fit_line(xs, ys)
            if line is None:
                entry[key] = None
                continue
            a, b = line
            entry[key] = {"a": a, "b": b, "at_1": max(a + b, max(ys)), "no_growth": b < 0}
        if rows:
            out[stage] = entry
    return out


def goals(results: list[StageResult], fitted: dict[str, dict[str, Any]], budget_gb: float) -> list[dict[str, Any]]:
    """Issue 20's goals as (goal, measured, verdict) rows."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, measured: str, ok: bool | None) -> None:
        rows.append({"goal": goal, "measured": measured, "verdict": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    for stage in STAGES[1:]:  # the scan is the baseline, not a stage of the project
        fit = fitted.get(stage, {}).get("peak_rss")
        if fit is not None:
            add(f"{stage}: peak RSS at f = 1 <= {budget_gb:g} GB", f"{fit['at_1'] / GB:.2f} GB",
                fit["at_1"] <= budget_gb * GB)
    for stage in ("import", "train"):
        ok_rows = sorted((r for r in results if r.stage == stage and r.ok), key=lambda r: r.fraction)
        if len(ok_rows) >= 2:
            lo, hi = ok_rows[0], ok_rows[-1]
            ratio = hi.peak_rss / max(lo.peak_rss, 1)
            add(f"{stage}: peak RSS at f = {hi.fraction:g} <= {GROWTH_MAX:g}x that at f = {lo.fraction:g}",
                f"{hi.peak_rss / GB:.2f} / {lo.peak_rss / GB:.2f} GB = {ratio:.2f}x", ratio <= GROWTH_MAX)
    tr = sorted((r for r in results if r.stage == "train" and r.ok), key=lambda r: r.fraction)
    if len(tr) >= 2:
        ratio = tr[-1].throughput / max(tr[0].throughput, 1e-9)
        add(f"train: samples/s at f = {tr[-1].fraction:g} >= {TRAIN_SPEED_MIN:g}x that at f = {tr[0].fraction:g}",
            f"{tr[-1].throughput:,.0f} / {tr[0].throughput:,.0f} = {ratio:.2f}x", ratio >= TRAIN_SPEED_MIN)
    for r in sorted((r for r in results if r.stage == "import" and r.ok), key=lambda r: r.fraction):
        if r.extra.get("over_scan") is not None:
            add(f"import at f = {r.fraction:g} <= {IMPORT_OVER_SCAN_MAX:g}x the bare pyarrow scan",
                f"{r.extra['over_scan']:.1f}x", r.extra["over_scan"] <= IMPORT_OVER_SCAN_MAX)
    return rows


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def _duration(s: float) -> str:
    if abs(s) >= 3600:
        return f"{s / 3600:.1f} h"
    if abs(s) >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def render(report: dict[str, Any]) -> str:
    """The report as text tables."""
    results = [StageResult(**r) for r in report["results"]]
    lines = ["measured (each stage a fresh process; cpu = its user + system seconds, peak RSS its own; "
             "serve/prefetch: the server's)", ""]
    head = f"{'f':>7} {'stage':<9} {'wall':>9} {'cpu':>7} {'throughput':>20} {'peak RSS':>9}  note"
    lines += [head, "-" * len(head)]
    for r in results:
        thr = f"{r.throughput:,.0f} {r.unit}/s" if r.ok and r.unit else "-"
        cpu = r.extra.get("cpu_s", r.extra.get("server_cpu_s"))
        cpu_text = f"{cpu:.0f}s" if cpu else "-"
        lines.append(f"{r.fraction:>7g} {r.stage:<9} {r.wall_s:>8.1f}s {cpu_text:>7} {thr:>20} "
                     f"{(r.peak_rss / GB if r.peak_rss else 0):>6.2f} GB  {r.note}")
    fitted, budget = report["fits"], report["budget_gb"]
    lines += ["", f"least squares y = a + b*f over f = {', '.join(f'{x:g}' for x in report['fractions'])}; "
                  f"extrapolated to f = 1 (the open Taobao-MM); budget {budget:g} GB", ""]
    head = (f"{'stage':<9} {'peak RSS = a + b*f':>26} {'at f = 1':>10} {'verdict':<14} "
            f"{'wall = a + b*f':>24} {'at f = 1':>10}")
    lines += [head, "-" * len(head)]
    for stage, entry in fitted.items():
        rss, wall = entry.get("peak_rss"), entry.get("wall_s")
        if rss is None or wall is None:
            lines.append(f"{stage:<9} (one fraction only: no line)")
            continue
        fits_budget = "fits" if rss["at_1"] <= budget * GB else f"EXCEEDS {budget:g} GB"
        fits_budget = {"generate": "(bench input)", "scan": "(baseline)"}.get(stage, fits_budget)
        notes = [n for n, on in (("fixed work", stage in FIXED_WORK), ("RSS: no growth measured", rss["no_growth"]),
                                 ("wall: no growth measured", wall["no_growth"])) if on]
        lines.append(f"{stage:<9} {_gb(rss['a']):>10} + {_gb(rss['b']):>10}*f {_gb(rss['at_1']):>10} {fits_budget:<14} "
                     f"{_wall_line(wall)} {_duration(wall['at_1']):>10}" + (f"  ({'; '.join(notes)})" if notes else ""))
    lines += ["", "goals (issue 20)", ""]
    head = f"{'goal':<62} {'measured':<30} verdict"
    lines += [head, "-" * len(head)]
    for g in report["goals"]:
        lines.append(f"{g['goal']:<62} {g['measured']:<30} {g['verdict']}")
    machine = report.get("machine") or {}
    load = "".join(f", load average {machine[k][0]:.1f} at the {w}" for k, w in
                   (("load_average_start", "start"), ("load_average_end", "end")) if machine.get(k))
    lines += ["", f"whole run: {_duration(report['total_s'])} on {machine.get('cpus', '?')} CPUs{load}"]
    return "\n".join(lines) + "\n"


def _wall_line(wall: dict[str, float]) -> str:
    return f"{wall['a']:>9.1f} s + {wall['b']:>9,.0f} s*f"


# -- main -------------------------------------------------------------------------------------------------
def _fractions(raw: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in raw.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--fractions must be numbers such as 0.001,0.003, got {raw!r}") from e
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"--fractions must be in (0, 1], got {raw!r}")
    return tuple(sorted(set(values)))


def _stages(raw: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in raw.split(",") if x.strip())
    unknown = [v for v in values if v not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stages {unknown}; valid: {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in values)


def parse_args(argv: list[str] | None) -> tuple[Options, argparse.Namespace]:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=_fractions, default=d.fractions, help="default 0.001,0.003,0.01")
    p.add_argument("--stages", type=_stages, default=d.stages, help=f"subset of {','.join(STAGES)} (default all)")
    p.add_argument("--budget-gb", type=float, default=d.budget_gb, help="peak RSS budget per stage at f = 1 (16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--work", default=None, help="work folder (default a temporary one); raw files there are reused")
    p.add_argument("--keep", action="store_true", help="keep the work folder (raw files, data sets, logs)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-model", default=d.train_model, help="model of the train stage (default muse)")
    p.add_argument("--train-samples", type=int, default=d.train_samples, help="train impressions (100 steps of 256)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-model", default=d.eval_model, help="model of the eval stage (default din)")
    p.add_argument("--eval-esu", default=d.eval_esu, help="its ESU (default ta; 'default' for the model's own)")
    p.add_argument("--eval-train-samples", type=int, default=d.eval_train_samples)
    p.add_argument("--backfill-users", type=int, default=d.backfill_users, help="users backfilled (default 1000)")
    p.add_argument("--backfill-chunk-size", type=int, default=d.backfill_chunk_size,
                   help="items per backfill chunk (default 4096)")
    p.add_argument("--prefetch-users", type=int, default=d.prefetch_users, help="users prefetched (default 1000)")
    p.add_argument("--serve-dtype", choices=("float32", "bfloat16", "float16", "int8"), default=d.serve_dtype,
                   help="`muse serve --dtype` of the serve stage (default int8: the shipped SCL's dtype; "
                        "float32 holds 4x the bytes)")
    p.add_argument("--device", default=d.device, help="MUSE_DEVICE of the stages (default cpu)")
    p.add_argument("--sequence-url", default=d.sequence_url, help="MUSE_SEQUENCE_URL (default file)")
    p.add_argument("--milvus-uri", default=None, help="a Milvus server to use instead of starting one")
    p.add_argument("--stage-timeout-s", type=float, default=d.stage_timeout_s)
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="runs of the scan and the import, alternating; each reports its fastest (default 3)")
    args = p.parse_args(argv)
    for name in ("train_samples", "batch_size", "eval_train_samples", "backfill_users", "backfill_chunk_size",
                 "prefetch_users"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prefetch_users > args.backfill_users:
        p.error("--prefetch-users must not exceed --backfill-users (only backfilled users have sequences)")
    for stage in args.stages:
        missing = [s for s in NEEDS.get(stage, ()) if s not in args.stages]
        if missing:
            p.error(f"stage {stage} needs {', '.join(missing)} in --stages")
    opts = Options(fractions=args.fractions, stages=args.stages, budget_gb=args.budget_gb, seed=args.seed,
                   train_model=args.train_model, train_samples=args.train_samples, batch_size=args.batch_size,
                   eval_model=args.eval_model, eval_esu=None if args.eval_esu == "default" else args.eval_esu,
                   eval_train_samples=args.eval_train_samples, backfill_users=args.backfill_users,
                   backfill_chunk_size=args.backfill_chunk_size, keep=args.keep, prefetch_users=args.prefetch_users,
                   serve_dtype=args.serve_dtype, device=args.device, sequence_url=args.sequence_url,
                   milvus_uri=args.milvus_uri, stage_timeout_s=args.stage_timeout_s,
                   repeats=max(1, args.repeats))
    return opts, args


def run(opts: Options, work: Path, progress: Any = print) -> dict[str, Any]:
    """Run every fraction; returns the report (results, fits, goals)."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    prefix = f"scale{os.getpid()}"
    milvus = None
    needs_milvus = any(s in opts.stages for s in ("backfill", "serve", "prefetch"))
    notes = []
    if needs_milvus and opts.milvus_uri is None:
        try:
            progress("starting a Milvus 2.3 server ...")
            shutil.rmtree(work / "milvus", ignore_errors=True)  # the bench's own, from an earlier run
            milvus = MilvusServer(work / "milvus").start()
            progress(f"  {milvus.uri} (pid {milvus.proc.pid})")
        except (ImportError, RuntimeError, TimeoutError) as e:
            notes.append(f"no Milvus server: {e}")
            progress(f"  no Milvus server ({e}): backfill, serve and prefetch are skipped")
    results: list[StageResult] = []
    uri = opts.milvus_uri or (milvus.uri if milvus is not None else None)
    try:
        for f in opts.fractions:
            progress(f"fraction {f:g}")
            try:
                results += run_fraction(f, opts, work, milvus, prefix, progress)
            finally:
                if uri and needs_milvus and not opts.keep:  # the next fraction's Milvus work starts afresh
                    _drop_collections(opts, work, prefix, f, uri)
    finally:
        if milvus is not None:
            milvus.stop()
    fitted = fits(results)
    return {"fractions": list(opts.fractions), "budget_gb": opts.budget_gb, "options": asdict(opts),
            "results": [asdict(r) for r in results], "fits": fitted, "goals": goals(results, fitted, opts.budget_gb),
            "notes": notes, "total_s": time.perf_counter() - t0,
            "machine": {"cpus": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg()}}


def _drop_collections(opts: Options, work: Path, prefix: str, f: float, uri: str) -> None:
    """Drop the Milvus collections and aliases fraction ``f`` wrote (the run's own prefix)."""
    from muse.settings import load_settings
    from muse.vectorstore import CollectionRef, VectorStore

    name = _dataset_name(f)
    try:
        settings = load_settings(env=muse_env(work / f"f-{f:g}" / "data", opts, uri, prefix))
        with VectorStore(settings) as store:
            versions = store.versions(name, SOURCE)
            if store.live_version(name, SOURCE) is not None:
                store.drop_live(name, SOURCE)
            for v in versions:
                store.drop_collections(CollectionRef(name, SOURCE, v))
    except Exception as e:  # cleanup must not hide the report
        print(f"warning: could not drop the collections of {name}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scan"]:  # child: the bare pyarrow scan
        print(json.dumps(scan_raw(argv[1])))
        return 0
    if argv[:1] == ["prefetch-client"]:  # child: the prefetch through a running server
        p = argparse.ArgumentParser(prog="bench.scale prefetch-client")
        p.add_argument("--address", required=True)
        p.add_argument("--dataset", required=True)
        p.add_argument("--users", type=int, required=True)
        a = p.parse_args(argv[1:])
        print(json.dumps(prefetch_client(a.address, a.dataset, a.users)))
        return 0
    if argv[:1] == ["render"]:  # a saved --json report as the text tables again
        print(render(json.loads(Path(argv[1]).read_text())), end="")
        return 0
    opts, args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="muse-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    try:
        report = run(opts, work, progress)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["work"] = str(work) if (args.keep or args.work) else None
    print(json.dumps(report, indent=2) if args.json else "\n" + render(report))
    return 0 if all(r["ok"] for r in report["results"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
