"""Exact top-k of long score rows in two stages: block maxima, then the best blocks only.

``torch.topk`` over ``[B, L]`` scores with ``L`` around 10^5 and ``k`` around 50 spends most of its
time copying and partially sorting every row. The GSU needs only the best ``k`` of each row, so:

1. split each row into blocks of :data:`BLOCK` scores and take each block's maximum (one
   vectorised, memory-bound pass);
2. keep the ``k`` blocks with the largest maxima;
3. ``topk`` over the ``k * BLOCK`` scores of those blocks (plus the short tail that does not fill a
   block).

This is exact: if a score ``s`` is among the row's best ``k`` but its block is not among the ``k``
best blocks, then ``k`` other blocks each hold a score above ``s`` (their maxima), so ``s`` would
not be among the best ``k``. With ties at the ``k``-th score the tied scores are equal on both paths;
which of the tied indices is kept may differ from ``torch.topk``.
"""

from __future__ import annotations

import torch

#: Scores per block.
BLOCK = 64
#: Rows shorter than this go straight to ``torch.topk`` (the two stages do not pay off).
MIN_LENGTH = 16_384


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` values and their indices along the last dim of 2-D ``scores [B, L]``, sorted best
    first; same contract as ``torch.topk(scores, k, dim=1)`` (``k <= L``)."""
    n_rows, length = scores.shape
    if length < MIN_LENGTH or k * BLOCK * 4 > length:
        return torch.topk(scores, k, dim=1)
    n_blocks = length // BLOCK
    body = n_blocks * BLOCK
    block_max = scores[:, :body].reshape(n_rows, n_blocks, BLOCK).amax(dim=2)  # [B, nb]
    _, best_blocks = torch.topk(block_max, k, dim=1, sorted=False)  # [B, k]
    offsets = torch.arange(BLOCK, device=scores.device)  # [BLOCK]
    cand = (best_blocks.unsqueeze(-1) * BLOCK + offsets).reshape(n_rows, k * BLOCK)  # [B, k*BLOCK]
    if body < length:  # the tail that does not fill a block is always a candidate
        tail = torch.arange(body, length, device=scores.device).expand(n_rows, length - body)
        cand = torch.cat([cand, tail], dim=1)  # [B, k*BLOCK + tail]
    values, j = torch.topk(scores.gather(1, cand), k, dim=1)  # [B, k]
    return values, cand.gather(1, j)
