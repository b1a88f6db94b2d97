"""A Milvus 2.3 server process (from the ``milvus`` PyPI package) on ports of its own.

``milvus-server`` alone cannot run beside another Milvus on one machine: ``--etcd-port`` only
tells Milvus where to *find* etcd, while the embedded etcd still listens on 2379/2380, and the
metrics port starts at 9091. This module picks free ports for every listener, moves the
embedded etcd through its own config file (``ETCD_CONFIG_PATH``), sets ``METRICS_PORT``, and
runs the server binary as a child it knows by PID, so that a test (or ``.ci/run``) can stop,
kill, freeze or restart exactly the server it started and nothing else.

Used two ways:

* in tests: ``with MilvusProcess(tmp_dir) as server: server.uri`` (``kill()``, ``pause()``,
  ``resume()``, ``restart()`` for fault tests);
* from ``.ci/run``: ``python -m tests.milvus_process --data DIR --state FILE`` runs in the
  foreground until SIGTERM/SIGINT, writing ``uri``, ``pid`` (the server binary) and the log
  path into ``FILE`` once the server answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

# The ``milvus`` package's template keys that open a listening socket.
PORT_KEYS = (
    "proxy_port",
    "proxy_internal_port",
    "root_coord_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)


#: Ports this process has handed out already: never handed out twice, so servers started by one
#: test run cannot be given each other's ports between choosing them and binding them.
_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel reports free right now (bound to port 0, then released),
    none of them handed out before by this process."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class MilvusProcess:
    """One ``milvus run standalone`` process with its own data dir and ports.

    The ports are chosen once, so :meth:`restart` brings the server back where its clients
    expect it (with its data, as after a crash).
    """

    def __init__(self, data_dir: Path | str, start_timeout: float = 240.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.start_timeout = start_timeout
        ports = free_ports(len(PORT_KEYS) + 3)
        self.ports = dict(zip(PORT_KEYS, ports))
        self.etcd_client_port, self.etcd_peer_port, self.metrics_port = ports[len(PORT_KEYS):]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh = None
        self._prepared = False

    # --- addresses ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.ports["proxy_port"]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # --- lifecycle ------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Write milvus.yaml (all ports, data under ``data_dir``) and the embedded etcd's config;
        unpack the server binary into the data dir (the ``milvus`` package ships it compressed)."""
        import milvus  # the embedded Milvus 2.3 server package (a test extra)

        config = milvus.MilvusServerConfig(data_dir=str(self.data_dir))
        config.resolve_storage()
        for key, port in self.ports.items():
            config.set(key, port)
        config.set("etcd_port", self.etcd_client_port)
        config.resolve()  # binds each configured port once to check it is free
        config.write_config()
        config.cleanup_listen_ports()
        milvus._initialize_data_files(str(self.data_dir))
        etcd = self.data_dir / "configs" / "embed-etcd.yaml"
        client = f"http://127.0.0.1:{self.etcd_client_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        etcd.write_text(
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n"
        )
        self._prepared = True

    def start(self) -> MilvusProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self._prepared:
            self._prepare()
        exe = self.data_dir / "bin" / "milvus"
        env = dict(os.environ)
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.metrics_port),
            MILVUS_RUN_DIR=str(self.data_dir / "run"),
            ETCD_USE_EMBED="true",
            ETCD_CONFIG_PATH=str(self.data_dir / "configs" / "embed-etcd.yaml"),
            LD_LIBRARY_PATH=f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(exe), "run", "standalone"],
            cwd=self.data_dir,
            env=env,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a ^C to the tests does not reach it
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Block until ``/healthz`` says OK and the proxy port answers; raise with the log's tail."""
        deadline = time.monotonic() + self.start_timeout
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"milvus exited during start-up (code {self.proc and self.proc.returncode})\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if b"OK" in resp.read() and port_open(self.port):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"milvus did not become healthy on {self.uri} within {self.start_timeout:.0f} s\n"
                           + self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds: only this server's PID."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal(signal.SIGCONT)
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (data already flushed stays)."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing (a frozen server)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> MilvusProcess:
        self.stop()
        return self.start()

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def __enter__(self) -> MilvusProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a Milvus 2.3 server on free ports until SIGTERM.")
    parser.add_argument("--data", required=True, type=Path, help="data directory (created)")
    parser.add_argument("--state", required=True, type=Path, help="JSON file written once the server answers")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for start-up")
    args = parser.parse_args(argv)
    server = MilvusProcess(args.data, start_timeout=args.timeout)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        print(str(exc), file=sys.stderr)
        server.stop()
        return 1
    tmp = args.state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"uri": server.uri, "pid": server.pid, "log": str(server.log_path),
                               "etcd_port": server.etcd_client_port, "metrics_port": server.metrics_port}))
    tmp.replace(args.state)
    while not stopping and server.proc is not None and server.proc.poll() is None:
        time.sleep(0.5)
    code = 0 if stopping else 1
    if not stopping:
        print("milvus exited on its own\n" + server.log_tail(), file=sys.stderr)
    server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
