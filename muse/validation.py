"""Input checks shared by the vector store, the retriever client and the services built on them.

Each check runs before any server call and raises :class:`muse.errors.ConfigurationError` (a
``ValueError``) naming the bad value, so that bad input is never reported as a backend outage.
Milvus stores ids as int64 and parses filter literals as int64; its expression parser reads
``-9223372036854775808`` as a negated out-of-range literal, so the smallest id accepted is
``-(2**63) + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from muse.errors import ConfigurationError

#: Id range accepted everywhere (Milvus int64 primary keys and filter literals).
ID_MIN = -(2**63) + 1
ID_MAX = 2**63 - 1
#: Most query vectors (targets) in one Milvus search request (``nq``); larger requests are split.
MAX_NQ = 16384
#: Most targets (item ids or vectors) in one retriever request, on every path (in process, Milvus
#: backend, gRPC): a larger request is refused at once, before any backend work. A ranking call
#: sends its candidates (hundreds to a few thousand); 4,096 unknown ids are refused by Milvus in
#: well under the 5 s search deadline, 100,000 were not (about 21 s).
MAX_TARGETS = 4096
#: Largest serialised request a GSU server accepts and a ``RemoteRetriever`` sends (bytes); also the
#: bound on an in-process ``append_behaviours`` (its ids and vectors).
MAX_REQUEST_BYTES = 16 << 20
#: Largest finite float32 magnitude: a vector beyond it does not survive the float32 cast.
_F32_MAX = float(np.finfo(np.float32).max)


def _show(values: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}]"


def check_id(value: Any, what: str = "id") -> int:
    """One integer id in ``ID_MIN..ID_MAX`` (``bool``, ``None``, floats and strings rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigurationError(f"{what} must be an integer, got {value!r}")
    v = int(value)
    if not ID_MIN <= v <= ID_MAX:
        raise ConfigurationError(f"{what} {v} is outside the int64 id range {ID_MIN}..{ID_MAX}")
    return v


def check_ids(values: Any, what: str = "ids", allow_empty: bool = True) -> np.ndarray:
    """A 1-D sequence of integer ids in ``ID_MIN..ID_MAX`` as an int64 array.

    Accepts lists/tuples of Python or numpy ints and integer numpy arrays; rejects ``None``,
    bools, floats, strings, nested sequences and out-of-range values, naming the first few.
    """
    if isinstance(values, (int, np.integer)) and not isinstance(values, (bool, np.bool_)):
        values = [values]
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ConfigurationError(f"{what} must be 1-D, got an array of shape {values.shape}")
        if np.issubdtype(values.dtype, np.integer):
            arr = values.astype(np.int64, copy=False)
            if values.dtype == np.uint64 and len(values) and int(values.max()) > ID_MAX:
                raise ConfigurationError(f"{what}: {int(values.max())} is outside the int64 id range")
            if len(arr) and int(arr.min()) < ID_MIN:
                raise ConfigurationError(f"{what}: {int(arr.min())} is outside the int64 id range {ID_MIN}..{ID_MAX}")
            if not allow_empty and len(arr) == 0:
                raise ConfigurationError(f"{what} is empty")
            return arr
        if values.dtype != object:
            raise ConfigurationError(f"{what} must be integers, got an array of dtype {values.dtype}")
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigurationError(f"{what} must be a sequence of integers, got {values!r}")
    items = list(values)
    if not allow_empty and not items:
        raise ConfigurationError(f"{what} is empty")
    bad = [v for v in items if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
    if bad:
        raise ConfigurationError(f"{what} must be integers, got {_show(bad)}")
    out_of_range = [int(v) for v in items if not ID_MIN <= int(v) <= ID_MAX]
    if out_of_range:
        raise ConfigurationError(f"{what}: {_show(out_of_range)} outside the int64 id range {ID_MIN}..{ID_MAX}")
    return np.asarray([int(v) for v in items], dtype=np.int64)


def check_vectors(
    vectors: Any,
    dim: int | None = None,
    what: str = "vectors",
    n: int | None = None,
    allow_empty: bool = False,
    allow_zero: bool = True,
) -> np.ndarray:
    """Finite float32 vectors ``[n, d]`` (a single ``[d]`` vector becomes ``[1, d]``).

    Args:
        dim: the expected width ``d`` (None: any width >= 1).
        n: the expected number of rows (None: any).
        allow_empty: accept ``[0, d]``.
        allow_zero: accept all-zero rows (stored behaviours without a vector); targets pass False.

    Raises:
        ConfigurationError: not numeric, wrong shape, NaN/inf (also values too large for float32),
        empty, or an all-zero row where ``allow_zero`` is False; the message names the rows.
    """
    try:
        arr = np.asarray(vectors)
    except (ValueError, TypeError) as e:
        raise ConfigurationError(f"{what} must be a numeric array [n, d]: {e}") from e
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ConfigurationError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1 and n is None:
        arr = arr.reshape(1, -1)
    elif arr.ndim == 1 and n == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ConfigurationError(f"{what} must be 2-D [n, d], got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ConfigurationError(f"{what} must be [n, {dim}], got shape {tuple(arr.shape)}")
    if arr.shape[1] == 0:
        raise ConfigurationError(f"{what} have width 0, got shape {tuple(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise ConfigurationError(f"{what}: expected {n} rows, got {arr.shape[0]}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ConfigurationError(f"{what} is empty (shape {tuple(arr.shape)}): give at least one vector")
    with np.errstate(over="ignore", invalid="ignore"):
        f64 = arr.astype(np.float64, copy=False)
        bad_rows = np.flatnonzero(~np.isfinite(f64).all(axis=1) | (np.abs(f64) > _F32_MAX).any(axis=1))
    if len(bad_rows):
        raise ConfigurationError(
            f"{what}: rows {bad_rows[:10].tolist()} hold NaN, inf or values beyond float32's range"
        )
    if not allow_zero and arr.shape[0]:
        zero = np.flatnonzero(~f64.any(axis=1))
        if len(zero):
            raise ConfigurationError(f"{what}: rows {zero[:10].tolist()} are all zero (no direction to search)")
    return arr.astype(np.float32, copy=False)


def check_positions(values: Any, what: str = "positions") -> np.ndarray:
    """Non-negative int64 positions in a history."""
    arr = check_ids(values, what)
    if len(arr) and int(arr.min()) < 0:
        raise ConfigurationError(f"{what}: negative position {int(arr.min())}")
    return arr


def check_same_length(what: str, **arrays: Any) -> int:
    """The common length of ``arrays``; ConfigurationError naming each length when they differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{v} {k}" for k, v in lengths.items())
        raise ConfigurationError(f"{what}: lengths differ ({shown})")
    return next(iter(lengths.values())) if lengths else 0


def check_target_count(n: int, what: str = "targets") -> int:
    """``n`` targets in one request: at most :data:`MAX_TARGETS` (ConfigurationError otherwise)."""
    if n > MAX_TARGETS:
        raise ConfigurationError(
            f"{n:,} {what} in one request; at most {MAX_TARGETS:,} per request (MAX_TARGETS): split it"
        )
    return n


def check_request_bytes(n_bytes: int, what: str = "request") -> int:
    """A request of ``n_bytes``: at most :data:`MAX_REQUEST_BYTES` (ConfigurationError otherwise)."""
    if n_bytes > MAX_REQUEST_BYTES:
        raise ConfigurationError(
            f"{what} of {n_bytes:,} bytes; at most {MAX_REQUEST_BYTES:,} bytes per request (MAX_REQUEST_BYTES): split it"
        )
    return n_bytes
