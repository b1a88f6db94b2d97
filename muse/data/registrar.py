"""Registration of a dataset in a process of its own, started while the dataset is being written.

Registering needs the metadata layer (SQLAlchemy and the models: about a quarter of a second of
imports) and a database connection, but what it writes is known only once the dataset is finished.
:class:`BackgroundRegistration` starts a child interpreter at once (``python -m
muse.data.registrar``) that loads the layer and connects while this process writes the dataset on
the other cores; :meth:`BackgroundRegistration.finish` hands it the finished dataset and returns
what :func:`muse.data.registry.register_if_ready` returns there (the dataset id, or None when the
database is not migrated). The child's log records are logged again here, its errors raised here
as the same :mod:`muse.errors` class with the same sentence. Where no child can be started the
registration runs in this process, as it would without this class.

The protocol on the child's stdin/stdout: length-prefixed pickles (the settings, then the dataset's
folder or None to stop) one way, one reply the other way.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

from muse import errors
from muse.errors import MuseError
from muse.settings import Settings

log = logging.getLogger(__name__)


def _send(stream: BinaryIO, value: Any) -> None:
    data = pickle.dumps(value)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    return pickle.loads(stream.read(int.from_bytes(head, "little")))


class BackgroundRegistration:
    """Registers one dataset from a child process started now; use as a context manager."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._proc: subprocess.Popen[bytes] | None = None
        # this process's modules (the folders and archives on its path; not import hooks' names)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.exists(p)))
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "muse.data.registrar"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            _send(self._proc.stdin, settings)
        except OSError as e:  # no child: finish() registers in this process
            log.debug("no registration process (%s): registering in this one", e)
            self._stop()

    def finish(self, dataset: Any) -> int | None:
        """Register ``dataset`` (a finished :class:`muse.data.format.Dataset`); the dataset id, or None
        when the database is not migrated. Raises what the registration raised."""
        proc, self._proc = self._proc, None
        if proc is None:
            from muse.data.registry import register_if_ready

            return register_if_ready(self.settings, dataset)
        try:
            _send(proc.stdin, str(Path(dataset.path).resolve()))
            reply = _receive(proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError):
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace").strip().splitlines()
            raise MuseError(f"the registration process of dataset {dataset.name!r} died (exit {proc.wait()})"
                            + (f": {err[-1]}" if err else "")) from None
        finally:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
            proc.wait()
        for name, level, message in reply["logs"]:
            logging.getLogger(name).log(level, "%s", message)
        if reply["error"] is not None:
            raise _error(*reply["error"])
        return reply["id"]

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            _send(proc.stdin, None)  # nothing to register: the child exits
        except OSError:
            pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> BackgroundRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()


def _error(kind: str, message: str, retriable: bool) -> Exception:
    """The child's exception as this process's: a :mod:`muse.errors` class by name, else a MuseError."""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, MuseError):
        return cls(message, retriable=retriable) if cls is errors.BackendUnavailable else cls(message)
    return MuseError(f"registering the dataset failed: {kind}: {message}")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    settings = _receive(stdin)
    from muse.data.format import Dataset
    from muse.data.registry import database_ready, register_if_ready

    try:  # connect now, while the parent works; errors are raised again by register_if_ready
        database_ready(settings)
    except Exception:  # noqa: BLE001 - reported when the dataset comes
        pass
    path = _receive(stdin)
    if path is None:
        return 0
    reply: dict[str, Any] = {"id": None, "error": None}
    try:
        reply["id"] = register_if_ready(settings, Dataset(Path(path)))
    except Exception as e:  # noqa: BLE001 - every error goes back to the parent
        reply["error"] = (type(e).__name__, str(e), bool(getattr(e, "retriable", True)))
    reply["logs"] = [r for r in collect.records if r[0].startswith("muse")]
    _send(stdout, reply)
    return 0


if __name__ == "__main__":
    code = _main()
    sys.stdout.flush()
    # The reply is sent and the registration committed: skip the interpreter's teardown (SQLAlchemy's
    # pool and every module: about 0.1 s the parent would wait for in finish()).
    os._exit(code)
