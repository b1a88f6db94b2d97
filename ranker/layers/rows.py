"""Row chunks for the whole-history searches (GSUs) of training batches.

A GSU scores every behaviour of every row of the batch (``[B, L]`` with L up to 1,000), and each
step materialises a ``[B, L, E]`` temporary (embeddings, projections, vectors): 12-50 MB per
batch of 100, freshly allocated (page faults) and written out of cache before the next op reads it
back. The rows of a batch are independent (each row's top K depends on that row only), so the
search runs over chunks of rows whose temporaries fit in a core's cache (:data:`CHUNK_BYTES`) and
the results are concatenated: the same values, 2-3x less time on the development machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

#: Bytes of the largest per-chunk temporary (``rows x L x E x 4``): a few rows of a 1,000-long
#: history; 1-4 MB measured best for every search on the development machine (L2 0.5-1 MB per core).
CHUNK_BYTES = 2 << 20


def row_chunks(n_rows: int, row_bytes: int, budget: int | None = None,
               device: torch.device | None = None) -> Iterator[slice]:
    """Consecutive slices covering ``range(n_rows)``, each of at most ``max(1, budget // row_bytes)``
    rows (``budget`` default: :data:`CHUNK_BYTES`). On an accelerator (``device`` not the CPU) one
    slice: there the launches of many small kernels cost more than the memory traffic saved."""
    if device is not None and torch.device(device).type != "cpu":
        budget = n_rows * max(1, int(row_bytes))
    step = max(1, (CHUNK_BYTES if budget is None else budget) // max(1, int(row_bytes)))
    if n_rows <= 0:  # one empty chunk, so that callers still get correctly shaped (empty) results
        yield slice(0, 0)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def chunked(n_rows: int, row_bytes: int, fn: Callable[[slice], tuple[torch.Tensor, ...]],
            budget: int | None = None, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """``fn(rows)`` for every chunk of :func:`row_chunks`, each output concatenated along dim 0.

    ``fn`` returns a tuple (e.g. a :class:`retriever.kernels.TopK`) of tensors whose first axis is
    the chunk's rows; the result has the same type with ``n_rows`` rows.
    """
    parts = [fn(rows) for rows in row_chunks(n_rows, row_bytes, budget, device)]
    if len(parts) == 1:
        return parts[0]
    joined = [torch.cat(field, dim=0) for field in zip(*parts, strict=True)]
    first = parts[0]
    return type(first)(*joined) if hasattr(first, "_fields") else tuple(joined)
