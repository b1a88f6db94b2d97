"""Request deadlines that hold whatever a backend does.

A caller opens a deadline for one request (``with deadline(5.0, "search"):``); every backend call
made inside it, in this thread, gets only the time that is left: :func:`remaining` gives it, and
:func:`call_within` runs a call that might block past it (a frozen server, a reconnect) on a
helper thread and stops waiting at the deadline, raising
:class:`~muse.errors.BackendUnavailable`. The abandoned call finishes on its own (its own timeout
is the time that was left), so helper threads never pile up for long.

Deadlines nest: an inner one never extends an outer one. Outside any deadline nothing changes
(:func:`remaining` is None and :func:`call_within` runs the call in the caller's thread), which is
how the backfill workers call the same code with their per-call timeouts only.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from muse.errors import BackendUnavailable

T = TypeVar("T")

#: Helper threads for calls made under a deadline (more only matter while a backend is frozen:
#: each blocked call holds one until its own timeout, at most the deadline it was given).
HELPER_THREADS = 32


class DeadlineExceeded(BackendUnavailable):
    """A call was refused or abandoned because its request's deadline passed (the backend did not
    answer in time: retriable, like any outage)."""


@dataclass(frozen=True)
class Deadline:
    """An absolute deadline (``time.monotonic()`` seconds) and what it is for."""

    at: float
    seconds: float  # the budget it was opened with
    what: str

    def left(self) -> float:
        return self.at - time.monotonic()


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("muse_deadline", default=None)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@contextmanager
def deadline(seconds: float | None, what: str = "request") -> Iterator[Deadline | None]:
    """Every backend call inside the block must end within ``seconds`` from now (None or <= 0: no
    new deadline; an outer one still holds). Yields the deadline in force."""
    outer = _current.get()
    if seconds is None or seconds <= 0:
        yield outer
        return
    mine = Deadline(time.monotonic() + float(seconds), float(seconds), what)
    if outer is not None and outer.at <= mine.at:
        yield outer
        return
    token = _current.set(mine)
    try:
        yield mine
    finally:
        _current.reset(token)


def current() -> Deadline | None:
    """The deadline in force in this context, or None."""
    return _current.get()


def remaining() -> float | None:
    """Seconds left before the deadline in force (may be <= 0), or None without one."""
    d = _current.get()
    return None if d is None else d.left()


def timeout_for(default: float | None) -> float | None:
    """A call's timeout: its ``default`` cut to the time left (None: no limit at all)."""
    left = remaining()
    if left is None:
        return default
    left = max(left, 0.001)
    return left if default is None else min(default, left)


def expired_error(label: str, where: str = "") -> DeadlineExceeded:
    """The error of a call refused or abandoned because the deadline in force has passed."""
    d = _current.get()
    budget = f"{d.seconds:.1f} s deadline of the {d.what}" if d is not None else "deadline"
    at = f" at {where}" if where else ""
    return DeadlineExceeded(f"{label}{at} did not answer within the {budget}")


def check(label: str, where: str = "") -> None:
    """Raise :func:`expired_error` when the deadline in force has passed."""
    left = remaining()
    if left is not None and left <= 0:
        raise expired_error(label, where)


def _helpers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(HELPER_THREADS, thread_name_prefix="muse-deadline")
        return _pool


def call_within(fn: Callable[..., T], *args: Any, label: str, where: str = "", **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, given up at the deadline in force.

    Without a deadline the call runs here. With one, it runs on a helper thread (in a copy of this
    context, so nested calls see the same deadline) and the caller waits only for the time left;
    past it :class:`DeadlineExceeded` (a ``BackendUnavailable``) says what did not answer. The call's own
    exceptions propagate unchanged.
    """
    left = remaining()
    if left is None:
        return fn(*args, **kwargs)
    if left <= 0:
        raise expired_error(label, where)
    ctx = contextvars.copy_context()
    future: Future = _helpers().submit(ctx.run, fn, *args, **kwargs)
    try:
        return future.result(timeout=left)
    except FutureTimeout:
        future.cancel()
        raise expired_error(label, where) from None


def wait_for(future: Future, label: str, where: str = "") -> Any:
    """``future.result()``, waited for only until the deadline in force (the work goes on)."""
    left = remaining()
    if left is None:
        return future.result()
    try:
        return future.result(timeout=max(left, 0.0))
    except FutureTimeout:
        raise expired_error(label, where) from None


__all__ = [
    "Deadline", "DeadlineExceeded", "call_within", "check", "current", "deadline", "expired_error", "remaining", "timeout_for",
    "wait_for",
]
