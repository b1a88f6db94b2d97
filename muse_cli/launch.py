"""``--nproc N``: the same command in N processes, started by torch.distributed's elastic launcher (the
engine of ``torchrun``: this runs what ``torchrun --standalone --nproc-per-node N -m muse_cli ...`` runs),
and a failed rank turned into one sentence.

The parent hands the launcher its own command line, ``--nproc`` included (so that rank 0 records it with
the run). Each child finds ``RANK``/``WORLD_SIZE`` in its environment and runs the command as one rank
(:func:`as_rank`); under ``torchrun`` (one or many machines) the children are the same. The parent
prints nothing on success (rank 0 prints the command's output); when a rank fails it prints one sentence
naming the rank and its cause, marks the run rank 0 was recording as failed and removes its checkpoint
if one was written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from muse.errors import ConfigurationError, DataError, MuseError, NotFoundError

#: Must equal ``ranker.distributed.LAUNCH_DIR_ENV`` (kept here so that the parser needs no torch).
LAUNCH_DIR_ENV = "MUSE_LAUNCH_DIR"
#: Exit code of a rank whose error was the user's input (as the CLI's own ``error:`` exit).
INPUT_ERROR_EXIT = 2


def add_nproc_option(p: argparse.ArgumentParser) -> None:
    """``--nproc N`` on a command that can run as many processes."""
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run as N processes on this machine through torch.distributed's elastic launcher "
                        "(gloo on CPU, NCCL on CUDA: one GPU each); on several machines start the same command "
                        "with torchrun instead (docs/scale.md)")


def launched() -> bool:
    """Whether a launcher (torchrun, ``--nproc``) started this process as one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(args: argparse.Namespace) -> bool:
    """Whether this invocation must start the launcher (``--nproc N`` given, not itself a rank).

    Raises:
        ConfigurationError: ``--nproc`` below 1, or different from the launcher's processes per node.
    """
    nproc = getattr(args, "nproc", None)
    if nproc is None:
        return False
    if isinstance(nproc, bool) or int(nproc) < 1:
        raise ConfigurationError(f"--nproc {nproc!r} must be a positive integer")
    if not launched():
        return True
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if int(nproc) != per_node:
        raise ConfigurationError(f"--nproc {nproc} but the launcher started {per_node} process(es) on this node: "
                                 "leave --nproc out under torchrun (its --nproc-per-node decides)")
    return False


def launch(args: argparse.Namespace, settings: Any) -> int:
    """Start ``args.nproc`` processes of this command line through the elastic launcher and wait.

    Returns the exit code: 0 when every rank succeeded, else that of the sentence printed (2 when the
    failing rank's error was the user's input, 1 otherwise, 130 when interrupted).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from ranker.distributed import default_threads

    nproc = int(args.nproc)
    if not args.verbose:
        _quiet_launcher_logs()
    with tempfile.TemporaryDirectory(prefix="muse-launch-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        saved = {k: os.environ.get(k) for k in (LAUNCH_DIR_ENV, "OMP_NUM_THREADS")}
        os.environ[LAUNCH_DIR_ENV] = str(state)
        # the ranks set their own torch threads; OpenMP's default is the same count (and torchrun stays quiet)
        os.environ.setdefault("OMP_NUM_THREADS", str(default_threads(nproc)))
        try:
            targs = parse_args(["--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                f"--log-dir={Path(tmp) / 'logs'}", "--module", "muse_cli"])
            targs.training_script_args = list(args.argv)  # given as is (torchrun's parser would read --nproc)
            run(targs)
        except ChildFailedError as e:
            sentence, code = failure_sentence(e.failures)
            print(f"error: {sentence}{_fail_run(settings, state, sentence)}", file=sys.stderr)
            return code
        except SignalException as e:
            sentence = f"interrupted by {e.sigval.name}: every rank was stopped"
            print(f"error: {sentence}{_fail_run(settings, state, sentence)}", file=sys.stderr)
            return 130
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return 0


def failure_sentence(failures: dict[int, Any]) -> tuple[str, int]:
    """One sentence naming the rank that failed first and its cause, and the exit code to return.

    ``failures`` is ``ChildFailedError.failures`` (global rank -> ``ProcessFailure``). A rank killed by a
    signal other than the launcher's own SIGTERM, or failed with its own error, is the cause; ranks that
    were stopped by the launcher or lost their peers are its consequences.
    """
    causes = {rank: _cause(f) for rank, f in failures.items()}
    rank = min(causes, key=lambda r: (causes[r][1], failures[r].timestamp, r))
    words, _ = causes[rank]
    f = failures[rank]
    others = len(failures) - 1
    tail = f"; {others} other rank(s) stopped" if others else ""
    code = INPUT_ERROR_EXIT if f.exitcode == INPUT_ERROR_EXIT else 1
    return f"rank {rank} (pid {f.pid}) failed: {words}{tail}", code


def _cause(f: Any) -> tuple[str, bool]:
    """(words for a ``ProcessFailure``'s cause, whether it is a consequence of another rank's failure)."""
    data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
    message = data.get("message")
    if isinstance(message, dict):  # torch's own error-file format
        message = message.get("message")
    secondary = bool((data.get("muse") or {}).get("secondary"))
    if f.exitcode < 0:
        name = f.signal_name()
        if name in ("SIGTERM", "SIGINT", "SIGHUP"):
            return f"stopped by {name}", True
        extra = " (out of memory, or killed from outside)" if name == "SIGKILL" else ""
        return f"killed by {name}{extra}", False
    if message:
        return str(message), secondary
    return f"exited with code {f.exitcode} (its output is above)", secondary


def _fail_run(settings: Any, state: Path, sentence: str) -> str:
    """Mark the run rank 0 noted as failed (unless it finished) and remove its checkpoint; words to add."""
    try:
        run_id = int(json.loads((state / "run.json").read_text())["run_id"])
    except (OSError, ValueError, KeyError):
        return ""
    from ranker.runs import checkpoint_path, finish_run, get_run

    info = get_run(settings, run_id)
    if info.status == "done":
        return f"; run {run_id} had finished and is kept"
    path = checkpoint_path(settings, run_id)
    for p in (path, path.with_name(path.name + ".tmp")):
        p.unlink(missing_ok=True)
    finish_run(settings, run_id, status="failed", metrics={**info.metrics, "error": sentence})
    return f"; run {run_id} is marked failed and has no checkpoint"


def as_rank(args: argparse.Namespace, settings: Any, work: Callable[[Any], int]) -> int:
    """Run ``work(dist)`` as one rank (a :class:`ranker.distributed.Dist`), leaving the process group after.

    A failure is written where the launcher reads it (``TORCHELASTIC_ERROR_FILE``); under ``--nproc`` the
    rank then exits quietly with its code (the parent prints the one sentence), under torchrun it is
    raised (the CLI prints it, torchrun names the rank).
    """
    from ranker.distributed import DistributedError, lost_peer, start, write_error_file

    dist = None
    ok = False
    try:
        dist = start(settings.resolve_device(), threads=getattr(args, "threads", None))
        code = work(dist)
        ok = True
        return code
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        e = exc
        if lost_peer(exc) and not isinstance(exc, MuseError):  # a collective whose peer went away: one sentence
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            e = DistributedError(f"rank {os.environ.get('RANK', '?')} lost contact with another rank ({first}); "
                                 "the launcher's report names the rank that failed first", secondary=True)
        write_error_file(str(e) if isinstance(e, MuseError) else f"{type(e).__name__}: {e}", lost_peer(e))
        if os.environ.get(LAUNCH_DIR_ENV) and not isinstance(e, KeyboardInterrupt):
            if args.verbose:
                import traceback

                traceback.print_exc()
            raise SystemExit(INPUT_ERROR_EXIT if isinstance(e, (ConfigurationError, NotFoundError, DataError))
                             else 1) from None
        if e is not exc:
            raise e from exc
        raise
    finally:
        if dist is not None:
            dist.close(ok=ok)


class _LauncherFilter(logging.Filter):
    """Drops the elastic launcher's own log lines (its banner, the SIGTERMs it sends, its failure dump):
    the parent prints one sentence instead. ``-v`` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("torch.distributed.elastic", "torch.distributed.run",
                                           "torch.distributed.launcher"))


def _quiet_launcher_logs() -> None:
    handlers = [*logging.getLogger().handlers, *logging.getLogger("torch").handlers,
                *logging.getLogger("torch.distributed").handlers]  # torch logs through its own handlers
    for handler in handlers:
        if not any(isinstance(f, _LauncherFilter) for f in handler.filters):
            handler.addFilter(_LauncherFilter())
