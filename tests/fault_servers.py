"""PostgreSQL and Redis server processes of a test's own, on free ports, that a fault test may
kill and start again (Milvus: :class:`tests.milvus_process.MilvusProcess`). Each is stopped by
the PID this module started, never by name."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.milvus_process import free_ports, port_open


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (install PostgreSQL server binaries)")
    return path


class PostgresProcess:
    """A throw-away PostgreSQL cluster (initdb in ``root``; trust auth) on a free port.

    ``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user and
    its commands run through ``runuser``.
    """

    def __init__(self, root: Path | None = None) -> None:
        # Its own folder directly under the temp dir: pytest's are private to root, and the
        # ``postgres`` user must reach the cluster's files.
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="muse-faults-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_ports(1)[0]
        self._as: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run([*self._as, *cmd], check=False, capture_output=True, timeout=120)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.decode(errors='replace')}")
        return res

    def init(self) -> PostgresProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self) -> PostgresProcess:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"), "-o", opts, "-w", "start")
        deadline = time.monotonic() + 30
        while not port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self

    def kill(self) -> None:
        """Stop at once, as a crash would (``pg_ctl stop -m immediate``)."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def stop(self) -> None:
        """Stop the cluster and remove its folder."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class RedisProcess:
    """A ``redis-server`` on a free port with an append-only file (messages survive a restart,
    as in a deployment that persists its broker)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.root)],
            stdout=open(self.root / "redis.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on {self.port}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    stop = kill
