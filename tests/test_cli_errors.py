"""Input errors and noise of the command line (issue 22): exit 2 with one ``error:`` sentence for every
input error, a missing dataset or user named as missing, read-only commands that create nothing, one
wording for an unreachable database, no kombu hostname warning, and the embedded Milvus Lite store
held by a ``muse serve``: a second process goes through the service or is told who holds the store."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muse.settings import load_settings
from muse_cli.main import main

REPO = Path(__file__).resolve().parent.parent
READ_ONLY = (["rank", "list"], ["rank", "show", "1"], ["compare", "--list"], ["compare", "--show", "1"],
             ["embed", "list"], ["backfill", "list"], ["backfill", "status", "1"], ["source", "list"],
             ["rank", "eval", "1"])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The CLI's settings from the environment, pointed at a data folder that does not exist."""
    for var in ("MUSE_DATABASE_URL", "MUSE_MILVUS_URI", "MUSE_BROKER_URL", "MUSE_CONFIG", "MUSE_QUEUE_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "nowhere" / "muse-data"
    monkeypatch.setenv("MUSE_DATA_DIR", str(data))
    monkeypatch.setenv("MUSE_DEVICE", "cpu")
    return data


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
def test_read_only_commands_at_a_wrong_path_create_nothing(env: Path, capsys) -> None:
    for argv in READ_ONLY:
        assert main(argv) == 2, argv
        assert _error(capsys) == (f"error: there is no database at {env / 'muse.sqlite'}: run `muse db upgrade` to "
                                  "create it, or set MUSE_DATA_DIR (MUSE_DATABASE_URL) to where yours is"), argv
    assert main(["data", "list"]) == 0 and "no datasets" in capsys.readouterr().out
    assert main(["db", "current"]) == 0 and "current: none (no database at " in capsys.readouterr().out
    assert main(["retrieve", "search", "--source", "scl", "--dataset", "nosuch", "--user", "1", "--items", "2"]) == 2
    assert "dataset 'nosuch' does not exist" in _error(capsys)
    assert not env.parent.exists()  # no folder, no empty database file, no Milvus Lite folder
    assert main(["db", "upgrade"]) == 0 and (env / "muse.sqlite").is_file()  # the one command that creates it


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends


def test_an_unreachable_database_is_worded_once(env: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MUSE_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{_closed_port()}/muse")
    lines = set()
    for argv in (["rank", "list"], ["data", "list"], ["embed", "list"], ["db", "current"], ["backfill", "list"],
                 ["compare", "--list"]):
        assert main(argv) == 2, argv
        lines.add(_error(capsys))
    assert len(lines) == 1, lines
    assert lines.pop().startswith("error: the database at postgresql+psycopg2://postgres@127.0.0.1:")


@pytest.mark.slow
def test_a_missing_user_or_dataset_is_an_input_error(env: Path, capsys) -> None:
    from muse import db
    from muse.data.simworld import generate_simworld

    settings = load_settings()
    db.upgrade(settings)
    ds = generate_simworld(settings, size="tiny", seed=0)
    users = ds.users().column("user_id").to_numpy()
    search = ["retrieve", "search", "--source", "scl", "--dataset", ds.name, "--items", "1"]
    assert main([*search, "--user", "999999"]) == 2
    assert _error(capsys) == (f"error: dataset {ds.name!r} has no user 999999 (its user ids run "
                              f"{users.min()}..{users.max()})")
    assert main([*search[:5], "nosuch", *search[6:], "--user", "1"]) == 2
    assert _error(capsys).startswith("error: dataset 'nosuch' does not exist (neither under ")
    assert not Path(settings.milvus_uri).exists()  # refused before the store was opened


def test_the_embedded_broker_connects_without_kombus_hostname_warning(tmp_path: Path, caplog) -> None:
    from indexer.celery_app import broker_url, create_app

    settings = load_settings(env={}, data_dir=tmp_path / "d")
    assert broker_url(settings) == "filesystem://localhost/"
    assert broker_url(load_settings(env={"MUSE_BROKER_URL": "redis://r:6379/0"})) == "redis://r:6379/0"
    app = create_app(settings)
    with caplog.at_level(logging.WARNING, logger="kombu"), app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        assert conn.info()["transport"] == "filesystem"
    assert not [r for r in caplog.records if "hostname" in r.getMessage()], caplog.text


def _muse(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "muse_cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.mark.slow
def test_a_second_process_beside_an_embedded_muse_serve(tmp_path: Path) -> None:
    """While ``muse serve`` holds the embedded Milvus Lite store, ``muse retrieve search`` in another
    process goes through the service; any other command that opens the store says which process holds
    it and what to do."""
    from muse import db, models
    from tests.test_serving import _free_port

    dataset, source = "ds-lite", "scl"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MUSE_")},
           "MUSE_DATA_DIR": str(tmp_path / "data"), "MUSE_DEVICE": "cpu",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    settings = load_settings(env={k: v for k, v in env.items() if k.startswith("MUSE_")})
    db.upgrade(settings)
    with db.session_scope(settings) as session:
        session.add(models.Dataset(name=dataset, kind="simworld", location=str(tmp_path), stats={}))
    # The collections are written by another process: Milvus Lite keeps a store open in the process
    # that opened it until that process ends.
    setup = f"""
import numpy as np
from muse.settings import load_settings
from muse.vectorstore import CollectionRef, VectorStore
from tests.test_serving import DIM, ITEMS, _unit
ref, rng = CollectionRef({dataset!r}, {source!r}, 1), np.random.default_rng(0)
vectors = _unit(rng, len(ITEMS))
history = ITEMS[rng.permutation(len(ITEMS))[:40]]
with VectorStore(load_settings()) as store:
    store.ensure_collections(ref, DIM)
    store.upsert_items(ref, ITEMS, vectors, np.zeros(len(ITEMS), np.int64))
    store.upsert_behaviours(ref, np.full(40, 11), np.arange(40), history, vectors[history - ITEMS[0]])
    store.set_live(ref)
print(int(history[0]))
"""
    made = subprocess.run([sys.executable, "-c", setup], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert made.returncode == 0, made.stderr
    first = int(made.stdout.split()[-1])
    port = _free_port()
    ready = tmp_path / "ready"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen([sys.executable, "-m", "muse_cli", "serve", "--dataset", dataset, "--source", source,
                             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
                             "--ready-file", str(ready)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "muse serve did not start in time"
            time.sleep(0.2)
        pid = proc.pid
        found = _muse(["retrieve", "search", "--source", source, "--dataset", dataset, "--user", "11",
                       "--items", str(first), "--k", "3"], env)
        assert found.returncode == 0, found.stdout + found.stderr
        assert f"(through the GSU service of process {pid} on {address}" in found.stdout
        assert f"{first:>12}   1.0000" in found.stdout  # the item itself ranks first
        listed = _muse(["source", "list"], env)
        assert listed.returncode == 2, listed.stdout + listed.stderr
        err = listed.stderr.strip()
        assert err.startswith(f"error: the embedded Milvus Lite store {settings.milvus_uri} is open in process "
                              f"{pid} (`") and "muse_cli serve --dataset ds-lite" in err, err
        assert f"stop that process (`kill {pid}`)" in err and len(err.splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    from muse.vectorstore import VectorStore

    with VectorStore(settings) as store:  # released with the server: this process opens it now
        assert f"muse_{dataset.replace('-', '_')}_{source}_v1_items" in store.list_collections()


KEEPALIVE_PROBE = """
import sys, time
from pymilvus import MilvusClient
from muse.settings import load_settings
from muse.vectorstore import VectorStore
if sys.argv[1] == "store":  # the project's connection
    client = VectorStore(load_settings(env={}, data_dir=sys.argv[2])).client
else:  # pymilvus' own defaults, for comparison
    import os
    os.makedirs(sys.argv[2], exist_ok=True)
    client = MilvusClient(uri=sys.argv[2] + "/milvus.db")
client.list_collections()
time.sleep(0.5)
print("IDLE-START", file=sys.stderr, flush=True)
time.sleep(12)  # pymilvus' channels ping every 10 s
print("IDLE-END", file=sys.stderr, flush=True)
client.list_collections()
"""


@pytest.mark.slow
def test_the_milvus_lite_connection_sends_no_keepalive_pings(tmp_path: Path) -> None:
    """The cause of Milvus Lite's GOAWAY "too_many_pings": pymilvus pings every 10 s and Milvus Lite's
    in-process server (grpcio defaults) accepts a ping at most every 5 minutes. gRPC's own trace shows
    the client's pings; an idle project connection sends none, pymilvus' defaults do."""
    env = {**os.environ, "GRPC_VERBOSITY": "debug", "GRPC_TRACE": "http_keepalive,bdp_estimator",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {kind: subprocess.Popen([sys.executable, "-c", KEEPALIVE_PROBE, kind, str(tmp_path / kind)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for kind in ("store", "pymilvus")}
    idle_pings = {}
    for kind, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        idle = err[err.index("IDLE-START"):err.index("IDLE-END")]
        idle_pings[kind] = len([ln for ln in idle.splitlines() if "CLIENT[" in ln and "Ping" in ln and " sent " in ln])
    assert idle_pings["pymilvus"] >= 1, idle_pings  # the trace shows pings at all
    assert idle_pings["store"] == 0, idle_pings
