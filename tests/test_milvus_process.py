"""The test command's Milvus launcher: two servers run side by side on one machine.

This is what lets two copies of ``.ci/run`` (or a developer's own Milvus and CI) share a machine:
every listener, the embedded etcd's and the metrics port included, is on a port of its own, and
stopping one server leaves the other untouched.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.milvus_process import MilvusProcess, port_open

pytestmark = [pytest.mark.milvus_server, pytest.mark.slow]


def _listening_ports(server: MilvusProcess) -> set[int]:
    return {*server.ports.values(), server.etcd_client_port, server.etcd_peer_port, server.metrics_port}


def test_two_servers_side_by_side_then_one_stopped(tmp_path: Path) -> None:
    from pymilvus import MilvusClient

    a, b = MilvusProcess(tmp_path / "a"), MilvusProcess(tmp_path / "b")
    assert not _listening_ports(a) & _listening_ports(b)
    errors: list[BaseException] = []

    def start(server: MilvusProcess) -> None:
        try:
            server.start()
        except BaseException as e:  # reported below with the server's log tail
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in (a, b)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        # the embedded etcd of each listens where its config file says, not on 2379/2380
        assert port_open(a.etcd_client_port) and port_open(b.etcd_client_port)
        ca, cb = MilvusClient(a.uri), MilvusClient(b.uri)
        ca.create_collection("only_in_a", dimension=4)
        assert "only_in_a" in ca.list_collections()
        assert "only_in_a" not in cb.list_collections()
        ca.close()

        a.stop()
        assert a.pid is None and not port_open(a.port)
        cb.create_collection("b_still_serves", dimension=4)
        assert "b_still_serves" in cb.list_collections()
        cb.close()
    finally:
        a.stop()
        b.stop()
