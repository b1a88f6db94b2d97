"""``muse.deadlines``: a request's deadline holds for every call made under it (no server needed)."""

from __future__ import annotations

import threading
import time

import pytest

from muse import deadlines
from muse.deadlines import DeadlineExceeded
from muse.errors import BackendUnavailable


def test_outside_a_deadline_calls_run_here_unbounded() -> None:
    assert deadlines.remaining() is None and deadlines.timeout_for(30.0) == 30.0
    assert deadlines.call_within(threading.get_ident, label="x") == threading.get_ident()


def test_a_blocked_call_is_given_up_at_the_deadline() -> None:
    release = threading.Event()
    with deadlines.deadline(0.3, "search"):
        assert 0 < deadlines.remaining() <= 0.3 and deadlines.timeout_for(30.0) <= 0.3
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"frozen server at here did not answer within the 0.3 s deadline of the search"):
            deadlines.call_within(release.wait, 10, label="frozen server", where="here")
        assert time.monotonic() - t0 < 0.6
        assert isinstance(DeadlineExceeded("x"), BackendUnavailable) and DeadlineExceeded("x").retriable
        time.sleep(0.35)
        with pytest.raises(DeadlineExceeded):  # past it: refused before the call
            deadlines.call_within(lambda: None, label="late call")
    release.set()


def test_deadlines_nest_and_reach_the_helper_thread() -> None:
    with deadlines.deadline(0.5, "outer"):
        with deadlines.deadline(10.0, "inner") as d:
            assert d.what == "outer" and deadlines.remaining() <= 0.5  # an inner one never extends
        with deadlines.deadline(0.1, "inner") as d:
            assert d.what == "inner"
            seen = deadlines.call_within(deadlines.remaining, label="probe")
            assert seen is not None and 0 < seen <= 0.1
    assert deadlines.remaining() is None
    errors = []

    def other_thread() -> None:  # a deadline belongs to its thread (context)
        errors.append(deadlines.remaining())

    with deadlines.deadline(1.0):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert errors == [None]
