"""The version lifecycle on Milvus Lite and the real Milvus 2.3 server: per-dataset and per-version
collections from real backfill jobs (chunks run in-process), promote checks, promote and rollback
switching what a long-running Retriever returns, a reader thread searching through a promote, drop,
list, and legacy collections adopted through the CLI."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MILVUS_SERVER_URI, _port_open, require_server

from muse.errors import ConfigurationError, NotFoundError
from muse.settings import Settings, load_settings
from muse.vectorstore import CollectionRef

SOURCE = "scl-taobao"  # vectors shipped with the dataset: a backfill needs no encoder
DIM = 16
A, B = "simworld-tiny-0", "simworld-tiny-1"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two tiny worlds, generated once; each backend's world copies them."""
    from muse.data.simworld import generate_simworld

    root = tmp_path_factory.mktemp("worlds")
    s = load_settings(env={}, data_dir=root / "muse-data", device="cpu")
    generate_simworld(s, size="tiny", seed=0)
    generate_simworld(s, size="tiny", seed=1)
    return root / "muse-data" / "datasets"


def ship_vectors(settings: Settings, name: str, seed: int) -> None:
    """(Re)write the dataset's ``embeddings/scl-taobao.parquet``: a random vector for every item."""
    from muse.data.format import EMBEDDINGS_SCHEMA, Dataset

    ds = Dataset.open(settings, name)
    ids = ds.item_ids()
    vectors = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
    (ds.path / "embeddings").mkdir(exist_ok=True)
    table = pa.table({"item_id": ids, "vector": list(vectors)}, schema=EMBEDDINGS_SCHEMA)
    pq.write_table(table, ds.path / "embeddings" / f"{SOURCE}.parquet")


def new_version(settings: Settings, name: str, seed: int) -> int:
    """Ship new vectors for dataset ``name`` and register them as the next version of the source."""
    from indexer import source_registry
    from muse.data.format import Dataset

    ship_vectors(settings, name, seed)
    path = Dataset.open(settings, name).embeddings_path(SOURCE)
    version = source_registry.next_version(settings, SOURCE, name)  # numbered per dataset
    source_registry.register_version(settings, SOURCE, version, kind="imported", dim=DIM, dataset_name=name,
                             checkpoint_path=path, config={"file": str(path), "dataset": name}, metrics={})
    return version


def backfill(settings: Settings, name: str, version: int | None = None, kinds: tuple[str, ...] = ("import", "behaviours")) -> int:
    """A real backfill job whose chunks (of ``kinds``) run in this process; returns the job id."""
    from indexer import backfill as bf
    from indexer import jobs

    job_id = jobs.create_job(settings, SOURCE, name, chunk_size=400, user_chunk_size=40, version=version)
    from muse import models
    from muse.db import session_scope

    with session_scope(settings) as session:
        chunks = [(c.id, c.kind) for c in session.get(models.BackfillJob, job_id).chunks]
    for chunk_id, kind in chunks:
        if kind in kinds:
            bf.run_chunk(settings, chunk_id)
    if set(kinds) >= {"import", "behaviours"}:
        jobs.advance_job(settings, job_id, app=object())  # nothing left to enqueue
    return job_id


@pytest.fixture(scope="module", params=["lite", "server"])
def world(request: pytest.FixtureRequest, datasets: Path, tmp_path_factory: pytest.TempPathFactory):
    """Per backend: dataset A backfilled as v1 (live) and, with other vectors, as v2 (beside it);
    dataset B as its own v1 (its live version: an imported source's versions are numbered per dataset)."""
    from indexer import backfill as bf
    from muse import db
    from muse.data.format import Dataset
    from muse.data.registry import register_dataset

    base = tmp_path_factory.mktemp(f"versions-{request.param}")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    extra = {}
    if request.param == "server":
        require_server("Milvus server at " + MILVUS_SERVER_URI, _port_open(MILVUS_SERVER_URI, 19530))
        extra["milvus_uri"] = MILVUS_SERVER_URI
    settings = load_settings(env={}, data_dir=base / "muse-data", device="cpu", milvus_prefix=prefix, **extra)
    db.upgrade(settings)
    for name in (A, B):
        shutil.copytree(datasets / name, settings.path("datasets", name))
        register_dataset(settings, Dataset.open(settings, name))
    ship_vectors(settings, A, seed=1)
    ship_vectors(settings, B, seed=2)
    jobs = {"a1": backfill(settings, A), "b": backfill(settings, B)}
    jobs["a2"] = backfill(settings, A, new_version(settings, A, seed=3))
    store = bf.get_store(settings)
    try:
        yield settings, store, jobs
    finally:
        for alias_pair in ((A, SOURCE), (B, SOURCE), (A, "i2i")):
            store.drop_live(*alias_pair)
        for name in store.list_collections():
            store.client.drop_collection(name)
        bf.close_stores()
        db._engine_for.cache_clear()


def expected(settings: Settings, name: str) -> tuple[int, int]:
    from muse.data.format import Dataset

    ds = Dataset.open(settings, name)
    return ds.n_items, int(ds.meta["n_behaviours"])


def test_datasets_and_versions_keep_exact_separate_counts(world) -> None:
    from muse import versions

    settings, store, _ = world
    a1, b1, a2 = CollectionRef(A, SOURCE, 1), CollectionRef(B, SOURCE, 1), CollectionRef(A, SOURCE, 2)
    for ref, name in ((a1, A), (b1, B), (a2, A)):
        assert (store.count_items(ref), store.count_behaviours(ref)) == expected(settings, name)
    user = 1
    assert store.count_behaviours(a1, user) == store.count_behaviours(a2, user)  # same history, two versions
    assert expected(settings, A) != expected(settings, B)
    # the first version of each (dataset, source) went live; the later one of A did not
    assert (store.live_version(A, SOURCE), store.live_version(B, SOURCE)) == (1, 1)
    assert (versions.live_record(settings, A, SOURCE), versions.live_record(settings, B, SOURCE)) == (1, 1)
    rows = {(r.dataset, r.version): r for r in versions.list_versions(settings, store)}
    assert set(rows) == {(A, 1), (A, 2), (B, 1)}
    assert rows[(A, 1)].live and not rows[(A, 2)].live and rows[(B, 1)].live
    assert rows[(A, 2)].job_status == "done" and rows[(A, 2)].promoted_at is None
    assert (rows[(A, 2)].items, rows[(A, 2)].behaviours) == expected(settings, A)


def test_promote_of_an_incomplete_version_is_refused_naming_what_is_missing(world) -> None:
    from muse import versions

    settings, store, _ = world
    v = new_version(settings, A, seed=4)
    job_id = backfill(settings, A, v, kinds=("import",))  # items written, no behaviour chunk ran
    n_items, n_behaviours = expected(settings, A)
    with pytest.raises(ConfigurationError) as err:
        versions.promote(settings, store, A, SOURCE, v)
    msg = str(err.value)
    n_chunks = 2 + -(-60 // 40)  # 600 items in chunks of 400, 60 users in chunks of 40
    assert f"backfill job {job_id} of {A}/{SOURCE}/v{v} is running, not done: 2 of {n_chunks} chunks unfinished" in msg
    assert f"holds 0 behaviours, dataset '{A}' has {n_behaviours} ({n_behaviours} missing)" in msg
    assert f"{n_items} items" not in msg  # the items are complete: not named as missing
    with pytest.raises(ConfigurationError, match="has no collections in Milvus"):
        versions.promote(settings, store, A, SOURCE, 42)
    assert store.live_version(A, SOURCE) == 1  # nothing switched
    versions.drop(settings, store, A, SOURCE, v)
    assert v not in store.versions(A, SOURCE)


def _reference(store, ref: CollectionRef, user: int, targets: list[int], k: int) -> list[list[int]]:
    """Items of the exact top-k of each target over the user's history, from ``ref``'s vectors
    (items, not positions: a re-clicked item ties with itself in any order)."""
    _, tv = store.get_item_vectors(ref, targets)
    h = store.fetch_user_behaviours(ref, user)
    out = []
    for t in tv:
        s = h.vectors @ (t / np.linalg.norm(t))
        out.append(h.item_ids[np.argsort(-s, kind="stable")[:k]].tolist())
    return out


def test_promote_and_rollback_switch_a_running_retriever_with_no_failed_request(world) -> None:
    """Reader threads (cache and Milvus backends) search in a loop while v2 is promoted: no request
    fails, every result is wholly one version's (its version's exact top-k), and both readers
    follow the switch within a few seconds. Then rollback switches back."""
    from muse import versions
    from retriever.client import Retriever

    settings, store, _ = world
    from muse.data.format import Dataset

    user, k = 3, 10
    targets = [int(i) for i in Dataset.open(settings, A).item_ids()[[0, 3, 150, 599]]]
    refs = {v: CollectionRef(A, SOURCE, v) for v in (1, 2)}
    want = {v: _reference(store, ref, user, targets, k) for v, ref in refs.items()}
    assert want[1] != want[2]  # the versions hold different vectors

    readers = {p: Retriever.from_settings(SOURCE, settings, dataset=A, backend=p, refresh_s=0.2,
                                          consistency_level="Bounded" if p == "milvus" else None)
               for p in ("cache", "milvus")}
    seen: dict[str, list[tuple[float, int]]] = {p: [] for p in readers}
    failures: list[str] = []
    wrong: list[str] = []
    stop = threading.Event()

    def read(backend: str) -> None:
        r = readers[backend]
        while not stop.is_set():
            try:
                res = r.search(user, targets, k=k)
            except Exception as e:  # any failed request is what this test counts
                failures.append(f"{backend}: {type(e).__name__}: {e}")
                continue
            got = [h.behaviour_item_ids.tolist() for h in res]
            if got != want.get(res.version):
                wrong.append(f"{backend}: a v{res.version} result that is not v{res.version}'s top-k: {got} != "
                             f"{want.get(res.version)}")
            seen[backend].append((time.monotonic(), res.version))

    try:
        assert all(r.search(user, targets, k=k).version == 1 for r in readers.values())
        threads = [threading.Thread(target=read, args=(p,), daemon=True) for p in readers]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t_promote = time.monotonic()
        res = versions.promote(settings, store, A, SOURCE, 2)
        assert (res.version, res.previous) == (2, 1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(s and s[-1][1] == 2 for s in seen.values()):
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        noticed = {p: min(ts for ts, v in s if v == 2 and ts >= t_promote) - t_promote for p, s in seen.items()}
        print(f"\npromote took {res.switch_s * 1000:.1f} ms (+{res.check_s * 1000:.1f} ms checks); readers saw v2 "
              f"after {', '.join(f'{p} {s:.2f} s' for p, s in noticed.items())}; requests "
              f"{sum(len(s) for s in seen.values())}, failed {len(failures)}")
        assert failures == [] and wrong == []
        for backend, s in seen.items():
            order = [v for _, v in s]
            assert order == sorted(order) and order[0] == 1 and order[-1] == 2, backend  # one switch, no flapping
            assert noticed[backend] < 5.0
        assert versions.live_record(settings, A, SOURCE) == 2 and store.live_version(A, SOURCE) == 2

        back = versions.rollback(settings, store, A, SOURCE)
        assert (back.version, back.previous) == (1, 2)
        for r in readers.values():
            r.refresh()  # True, unless the background check (every 0.2 s here) switched first
            assert r.version == 1
            assert [h.behaviour_item_ids.tolist() for h in r.search(user, targets, k=k)] == want[1]
        with pytest.raises(ConfigurationError, match="nothing to roll back to"):
            versions.rollback(settings, store, A, SOURCE)
        # a pinned reader stays on its version whatever is live
        with Retriever.from_settings(SOURCE, settings, dataset=A, version=2, backend="milvus") as pinned:
            assert not pinned.refresh() and pinned.search(user, targets, k=k).version == 2
    finally:
        stop.set()
        for r in readers.values():
            r.close()


def test_drop_refuses_the_live_version(world) -> None:
    from muse import versions

    settings, store, _ = world
    with pytest.raises(ConfigurationError, match="is the live version"):
        versions.drop(settings, store, B, SOURCE, 1)
    with pytest.raises(NotFoundError, match="no collections and no record"):
        versions.drop(settings, store, B, SOURCE, 77)
    assert store.count_items(CollectionRef(B, SOURCE, 1)) == expected(settings, B)[0]


def test_cli_list_promote_rollback_and_legacy_adopt(world, monkeypatch, capsys) -> None:
    """The ``muse source`` commands, and collections of the old naming: detected with the exact
    command, adopted as a version of the dataset their job was for, then searchable."""
    import json

    from pymilvus import DataType, MilvusClient

    from muse import models
    from muse.db import session_scope
    from muse.vectorstore import NUM_PARTITIONS
    from muse_cli.main import main

    settings, store, _ = world
    if not settings.embedded_milvus:
        pytest.skip("the CLI runs the same code on both backends; once is enough")
    for var, value in (("MUSE_DATA_DIR", settings.data_dir), ("MUSE_MILVUS_PREFIX", settings.milvus_prefix),
                       ("MUSE_MILVUS_URI", settings.milvus_uri)):
        monkeypatch.setenv(var, str(value))

    assert main(["source", "list", "--dataset", A, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["live"]) for v in listed["versions"]] == [(1, True), (2, False)]
    assert main(["source", "promote", A, SOURCE, "2"]) == 0
    out = capsys.readouterr().out
    assert f"promoted {A}/{SOURCE}: live v2 (was v1)" in out and "_simworld_tiny_0_scl_taobao_v2_items" in out
    assert f"item table for the GSU servers: {settings.path('embeddings', SOURCE, 'v2', 'items-' + A)}" in out
    assert main(["source", "list"]) == 0
    table = capsys.readouterr().out
    assert "live" in table and f"{B:<22}" in table
    assert main(["source", "rollback", A, SOURCE]) == 0
    assert "live v1 (was v2)" in capsys.readouterr().out
    assert main(["source", "drop", A, SOURCE, "1"]) == 2
    assert "is the live version" in capsys.readouterr().err
    assert main(["source", "drop", A, SOURCE, "2"]) == 2  # live until a moment ago
    assert "readers may still be on it" in capsys.readouterr().err

    # Legacy: an old-style i2i pair written by a backfill of dataset A (a job of the old naming).
    legacy = {kind: f"{settings.milvus_prefix}_i2i_{kind}" for kind in ("items", "behaviours")}
    rng = np.random.default_rng(5)
    items = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    items.add_field("item_id", DataType.INT64, is_primary=True)
    items.add_field("category", DataType.INT64)
    items.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    bhv = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    bhv.add_field("pk", DataType.INT64, is_primary=True)
    bhv.add_field("user_id", DataType.INT64, is_partition_key=True)
    bhv.add_field("item_id", DataType.INT64)
    bhv.add_field("position", DataType.INT64)
    bhv.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    store.client.create_collection(legacy["items"], schema=items, index_params=store._index_params())
    store.client.create_collection(legacy["behaviours"], schema=bhv, index_params=store._index_params(),
                                   num_partitions=NUM_PARTITIONS)
    vec = rng.standard_normal((5, DIM)).astype(np.float32)
    store.client.insert(legacy["items"], [{"item_id": i, "category": 0, "vector": vec[i].tolist()} for i in range(5)])
    store.client.insert(legacy["behaviours"], [{"pk": i, "user_id": 8, "item_id": i, "position": i,
                                                "vector": vec[i].tolist()} for i in range(5)])
    from indexer.checkpoints import register_untrained_encoder

    i2i = register_untrained_encoder(settings, "i2i", seed=0)
    with session_scope(settings) as session:
        ds_id = session.query(models.Dataset.id).filter_by(name=A).scalar()
        session.add(models.BackfillJob(source_id=i2i.id, dataset_id=ds_id, status="done", chunk_size=1,
                                       options={"source": "i2i", "dataset": A}))
    assert main(["source", "list", "--source", "i2i"]) == 0
    hint = capsys.readouterr().out
    command = f"muse source adopt i2i --dataset {A} --version {i2i.version}"
    assert "legacy: Milvus holds collections of the old naming for source 'i2i'" in hint and command in hint
    with pytest.raises(NotFoundError, match="no live version.*" + command):
        from retriever.client import Retriever

        Retriever.from_settings("i2i", settings, dataset=A)
    assert main(command.split()[1:]) == 0
    assert f"as {A}/i2i v{i2i.version}, live" in capsys.readouterr().out
    ref = CollectionRef(A, "i2i", i2i.version)
    assert store.legacy_collections() == [] and store.count_behaviours(ref, 8) == 5
    with Retriever.from_settings("i2i", settings, dataset=A, backend="milvus") as r:
        res = r.search(8, [2], k=1)
        assert res.version == i2i.version and res[0].positions.tolist() == [2]
    assert main(["source", "adopt", "i2i", "--drop"]) == 2
    assert "no legacy collections" in capsys.readouterr().err
