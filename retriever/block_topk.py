"""Exact top-k of long score rows in two stages: block maxima, then the best blocks only.

``torch.topk`` over ``[B, L]`` scores with ``L`` around 10^5 and ``k`` around 50 spends most of its
time copying and partially sorting every row. The GSU needs only the best ``k`` of each row, so:

1. split each row's first ``BLOCK * nb`` scores into ``nb`` blocks of :data:`BLOCK` (block ``j``
   holds the scores ``j, j + nb, j + 2 nb, ...``: a strided split, so that the maxima are an
   element-wise maximum of ``BLOCK`` contiguous slices, which vectorises well) and take each block's
   maximum;
2. keep the ``k`` blocks with the largest maxima;
3. ``topk`` over the ``k * BLOCK`` scores of those blocks plus the short tail that fills no block.

This is exact: if a score ``s`` is among the row's best ``k`` but its block is not among the ``k``
best blocks, then ``k`` other blocks each hold a score above ``s`` (their maxima), so ``s`` would
not be among the best ``k``. With ties at the ``k``-th score the tied scores are equal on both paths;
which of the tied indices is kept may differ from ``torch.topk``.

The maxima are taken on the scores' bits read as integers (int32 for float32, int16 for half
types), several times faster than a floating-point ``amax`` for half types on CPU. For non-negative
floats the integer order is the float order, and every negative float reads as a negative integer,
below them all; so the step is exact whenever each row has at least ``k`` blocks holding a score
``>= 0``, which is checked (cosines of related items are positive). Otherwise the call falls back to
``torch.topk``.
"""

from __future__ import annotations

import torch

#: Scores per block.
BLOCK = 16
#: Rows shorter than this go straight to ``torch.topk`` (the two stages do not pay off).
MIN_LENGTH = 16_384
#: Integer dtype of the same width as each score dtype (for the block maxima).
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` values and their indices along the last dim of 2-D ``scores [B, L]``, sorted best
    first; same contract as ``torch.topk(scores, k, dim=1)`` (``k <= L``)."""
    n_rows, length = scores.shape
    if length < MIN_LENGTH or k * BLOCK * 4 > length or scores.dtype not in _BITS or scores.stride(1) != 1:
        return torch.topk(scores, k, dim=1)
    n_blocks = length // BLOCK
    body = n_blocks * BLOCK
    bits = scores.view(_BITS[scores.dtype])[:, :body].reshape(n_rows, BLOCK, n_blocks)  # [B, BLOCK, nb]
    block_max = bits.amax(dim=1)  # [B, nb]: exact order among blocks whose maximum is >= 0
    top_max, best_blocks = torch.topk(block_max, k, dim=1, sorted=False)  # [B, k]
    if int(top_max.min()) < 0:  # some row has fewer than k blocks holding a score >= 0
        return torch.topk(scores, k, dim=1)
    members = torch.arange(BLOCK, device=scores.device) * n_blocks  # [BLOCK]: offsets within a block
    cand = (best_blocks.unsqueeze(-1) + members).reshape(n_rows, k * BLOCK)  # [B, k*BLOCK]
    if body < length:  # the tail that does not fill a block is always a candidate
        tail = torch.arange(body, length, device=scores.device).expand(n_rows, length - body)
        cand = torch.cat([cand, tail], dim=1)  # [B, k*BLOCK + tail]
    values, j = torch.topk(scores.gather(1, cand), k, dim=1)  # [B, k]
    return values, cand.gather(1, j)


def topk_columns(scores_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_rows` of ``scores_t.T`` for scores laid out ``[L, B]`` (one column per target):
    returns ``[B, k]`` values and row indices, best first.

    The GSU computes ``history @ targets.T`` in this layout when the history is long: the long
    matrix is then the product's left operand, which the CPU matrix kernels stream as it is, while
    ``targets @ history.T`` makes them repack the whole history on every call (see docs/retriever.md,
    GSU timings). The blocks are the same strided split.
    """
    length, n_cols = scores_t.shape
    if (
        length < MIN_LENGTH
        or k * BLOCK * 4 > length
        or scores_t.dtype not in _BITS
        or not scores_t.is_contiguous()
    ):
        return torch.topk(scores_t.T, k, dim=1)
    n_blocks = length // BLOCK
    body = n_blocks * BLOCK
    bits = scores_t.view(_BITS[scores_t.dtype])[:body].view(BLOCK, n_blocks, n_cols)  # [BLOCK, nb, B]
    block_max = bits.amax(dim=0).T  # [B, nb] (a view): exact order among blocks with a max >= 0
    top_max, best_blocks = torch.topk(block_max, k, dim=1, sorted=False)  # [B, k]
    if int(top_max.min()) < 0:  # some target has fewer than k blocks holding a score >= 0
        return torch.topk(scores_t.T, k, dim=1)
    members = torch.arange(BLOCK, device=scores_t.device) * n_blocks  # [BLOCK]
    rows = (best_blocks.unsqueeze(-1) + members).reshape(n_cols, k * BLOCK)  # [B, k*BLOCK]
    if body < length:  # the tail that does not fill a block is always a candidate
        tail = torch.arange(body, length, device=scores_t.device).expand(n_cols, length - body)
        rows = torch.cat([rows, tail], dim=1)  # [B, k*BLOCK + tail]
    col = torch.arange(n_cols, device=scores_t.device).unsqueeze(1)  # [B, 1]
    cand_scores = torch.take(scores_t, rows * n_cols + col)  # [B, k*BLOCK + tail]
    values, j = torch.topk(cand_scores, k, dim=1)  # [B, k]
    return values, rows.gather(1, j)
