"""GSU kernels: cosine top-K over a behaviour history and SimTier counts.

Pure functions of tensors (no I/O, no hidden device state), shared by serving (the device cache)
and training (the ranker imports them), so both compute the same thing. They run on any device
the inputs live on. Histories may be stored as float32, bfloat16, float16 or int8 (with a
per-row scale); scores are always accumulated and returned in float32.

Conventions (see ``docs/method.md``):

* cosine = L2-normalise both sides, then one matrix product;
* padded behaviours and behaviours without a vector (``valid`` false, or an all-zero row) score
  :data:`MISSING_SCORE` (-1.1, below any cosine) and rank after every real behaviour;
* ``k`` larger than the history returns the whole history, the extra slots marked invalid;
* SimTier tier id = ``ceil(cos * 10) + 10`` in :data:`muse.simtier.N_TIERS` = 22 slots, counted only over
  valid retrieved scores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from muse.arrays import check_k
from muse.simtier import N_TIERS
from retriever.block_topk import MIN_LENGTH as BLOCK_TOPK_MIN_LENGTH
from retriever.block_topk import topk_columns, topk_rows
from retriever.score_products import native_half_is_faster, score_buffer, scores_into_buffer

#: Score given to padding and to behaviours without a vector: below every cosine (-1).
MISSING_SCORE = -1.1
#: Storage dtypes a history may have.
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
#: History rows up-cast to float32 per matrix product when the history is stored compressed on CPU:
#: small enough that the float32 copy stays in cache, large enough that the loop costs nothing.
CPU_CHUNK_ROWS = 8192
#: A half-precision history without a mask is searched by a native half matrix product whose
#: best :func:`rerank_candidates` are rescored exactly in float32: on an accelerator always; on CPU
#: (shorter histories are up-cast chunk by chunk, which is as fast there and exact)
#:
#: * with up to :data:`RERANK_MAX_TARGETS_CPU` targets, for at least :data:`RERANK_MIN_ROWS_CPU`
#:   rows: a memory-bound product, where half storage halves the traffic;
#: * with more targets, for at least :data:`RERANK_MIN_ROWS_MANY_TARGETS_CPU` rows, when this CPU
#:   multiplies halves natively faster than float32 (AMX; measured once per process, see
#:   :func:`retriever.score_products.native_half_is_faster`). The timings behind the thresholds:
#:   see docs/retriever.md, GSU timings.
RERANK_MAX_TARGETS_CPU = 16
RERANK_MIN_ROWS_CPU = 4096
RERANK_MIN_ROWS_MANY_TARGETS_CPU = 32_768


def rerank_candidates(k: int, n_rows: int) -> int:
    """Candidates taken from the half-precision scores for exact rescoring: ``k + k // 4 + 8``.
    bfloat16 scores near the k-th best are off by at most ~1e-3; on 100K random 128-d rows the
    recall@50 against the exact float32 ranking stops improving at 8 extra candidates."""
    return min(n_rows, k + k // 4 + 8)


class TopK(NamedTuple):
    """Result of :func:`gsu_topk`; every field has the shape ``[..., K]`` of the targets' batch."""

    scores: torch.Tensor  # float32 cosine, MISSING_SCORE where not valid
    indices: torch.Tensor  # int64 row in the history; 0 in slots beyond the history
    valid: torch.Tensor  # bool: the slot holds a real behaviour


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise (last dim) L2 normalisation in float32; all-zero rows stay zero."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
    return x / norm.clamp_min(eps)


def quantise_int8(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation: ``vectors ~= q * scale[:, None]``.

    Args:
        vectors: ``[L, d]`` floating point.

    Returns:
        ``(q int8[L, d], scale float32[L])``; zero rows get scale 0.
    """
    v = vectors.float()  # [L, d]
    amax = v.abs().amax(dim=-1)  # [L]
    scale = amax / 127.0  # [L]
    q = torch.round(v / scale.clamp_min(1e-30).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)  # [L, d]
    return q, scale


def _scores_2d(
    targets: torch.Tensor, history: torch.Tensor, history_scale: torch.Tensor | None, chunk_rows: int | None
) -> torch.Tensor:
    """float32 ``targets [B, d] @ history[L, d]^T -> [B, L]`` for any storage dtype of ``history``."""
    n_rows = history.shape[0]
    if history.dtype == torch.float32:
        scores = scores_into_buffer(targets, history)  # [B, L]
    elif history.device.type == "cpu" and chunk_rows is None and n_rows <= 2 * CPU_CHUNK_ROWS:
        scores = scores_into_buffer(targets, history.float())  # [B, L]; one up-cast beats a loop here
    else:
        if chunk_rows is None:
            chunk_rows = CPU_CHUNK_ROWS if history.device.type == "cpu" else n_rows
        chunk_rows = max(1, chunk_rows)
        scores = score_buffer(targets.shape[0], n_rows, torch.float32, targets.device)  # [B, L]
        for start in range(0, n_rows, chunk_rows):
            block = history[start : start + chunk_rows].float()  # [C, d]
            torch.mm(targets, block.T, out=scores[:, start : start + chunk_rows])  # [B, C]
    if history_scale is not None:
        scores.mul_(history_scale.float().unsqueeze(0))  # [B, L]
    return scores


def gsu_topk(
    targets: torch.Tensor,
    history: torch.Tensor,
    k: int,
    valid: torch.Tensor | None = None,
    *,
    normalised: bool = False,
    history_scale: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> TopK:
    """Cosine top-``k`` of each target over a behaviour history.

    Shapes: single history ``targets [B, d]``, ``history [L, d]``, ``valid [L]`` -> ``[B, K]``;
    batched ``targets [N, d]`` or ``[N, T, d]``, ``history [N, L, d]``, ``valid [N, L]`` ->
    ``[N, K]`` or ``[N, T, K]`` (one ``bmm`` and one ``topk``). ``K = k`` always: when ``k`` exceeds
    the history the extra slots have ``valid`` false, score :data:`MISSING_SCORE` and index 0.

    Args:
        targets: target item vectors (any float dtype; need not be normalised).
        history: behaviour vectors, float32/bfloat16/float16/int8 (float64 is cast to float32).
        k: number of behaviours to keep per target (positive int).
        valid: bool mask of real behaviours (false = padding or no vector); default all true.
            All-zero rows are treated as missing too.
        normalised: the caller guarantees that the targets and the history rows are already
            L2-normalised and that rows without a vector are masked in ``valid`` or absent (the
            device cache does this once at load time), so the kernel skips the normalisation and
            zero-row passes; with ``valid=None`` it is then one matrix product + ``topk`` (for a
            float16/bfloat16 history: a native half-precision product whose best candidates are
            rescored exactly in float32, see :data:`RERANK_MAX_TARGETS_CPU`).
        history_scale: per-row float scale ``[L]`` / ``[N, L]`` of an int8 history (see
            :func:`quantise_int8`); scores are multiplied by it.
        chunk_rows: history rows up-cast per matrix product for a compressed 2-D history
            (default :data:`CPU_CHUNK_ROWS` on CPU, all rows on an accelerator).

    Returns:
        :class:`TopK` with float32 scores (best first), int64 indices into the history and a bool mask.

    Raises:
        ValueError: ``k`` is not a positive int (ConfigurationError, a ValueError), or the shapes or dtypes do not fit together.
    """
    k = check_k(k)
    if (
        normalised
        and valid is None
        and history_scale is None
        and history.dtype == torch.float32
        and targets.dtype == torch.float32
        and targets.dim() == 2
        and history.dim() == 2
        and history.shape[0] >= k
        and targets.shape[1] == history.shape[1]
        and targets.device == history.device
    ):
        # Serving hot path (device cache, float32): exactly one matrix product + topk.
        best, idx = _product_topk(targets, history, k)  # [B, k]
        return TopK(scores=best, indices=idx, valid=torch.ones_like(idx, dtype=torch.bool))
    if history.dtype == torch.float64:
        history = history.float()
    if history.dtype not in STORAGE_DTYPES:
        raise ValueError(f"history dtype {history.dtype} is not one of {STORAGE_DTYPES}")
    if history.dtype == torch.int8 and history_scale is None:
        raise ValueError("an int8 history needs history_scale (see quantise_int8)")
    if history.dim() == 2:
        return _topk_single(targets, history, k, valid, normalised, history_scale, chunk_rows)
    if history.dim() == 3:
        return _topk_batched(targets, history, k, valid, normalised, history_scale)
    raise ValueError(f"history must be [L, d] or [N, L, d], got shape {tuple(history.shape)}")


def _valid_mask(history: torch.Tensor, valid: torch.Tensor | None, normalised: bool) -> torch.Tensor | None:
    """``valid`` and-ed with "row is non-zero" (skipped when the caller already did it); None when
    every row is known to be valid."""
    lead = history.shape[:-1]
    if valid is None and normalised:
        return None
    if valid is None:
        valid = torch.ones(lead, dtype=torch.bool, device=history.device)
    elif tuple(valid.shape) != tuple(lead):
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(lead)} for the history")
    valid = valid.to(device=history.device, dtype=torch.bool)
    if not normalised:
        valid = valid & (history != 0).any(dim=-1)  # [..., L]
    return valid


def _finish(scores: torch.Tensor, valid: torch.Tensor | None, k: int) -> TopK:
    """Mask invalid scores, take the top ``k`` along the last dim and pad to ``k`` slots."""
    if valid is not None:
        scores = scores.masked_fill_(~valid, MISSING_SCORE)  # [..., L]; scores are the caller's scratch
    top = min(k, scores.shape[-1])
    if scores.dim() == 2:
        best, idx = topk_rows(scores, top)  # [B, top]
    else:
        best, idx = torch.topk(scores, top, dim=-1, largest=True, sorted=True)  # [..., top]
    if valid is None:  # every row is a real behaviour
        ok = torch.ones_like(best, dtype=torch.bool)  # [..., top]
    else:
        ok = best > MISSING_SCORE  # [..., top]
    return _pad(best, idx, ok, k, masked=valid is not None)


def _pad(best: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, k: int, masked: bool) -> TopK:
    """Pad ``[..., top]`` results to ``k`` slots (invalid, MISSING_SCORE, index 0)."""
    top = best.shape[-1]
    if top == k and not masked:
        return TopK(scores=best, indices=idx, valid=ok)
    if top < k:
        pad = k - top
        best = torch.nn.functional.pad(best, (0, pad), value=MISSING_SCORE)  # [..., k]
        idx = torch.nn.functional.pad(idx, (0, pad), value=0)  # [..., k]
        ok = torch.nn.functional.pad(ok, (0, pad), value=False)  # [..., k]
    best = best.masked_fill(~ok, MISSING_SCORE)
    return TopK(scores=best, indices=idx, valid=ok)


def _product_topk(targets: torch.Tensor, history: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``targets [B, d] @ history[L, d]^T`` (in the history's dtype), ``k <= L``: for long
    histories computed as ``history @ targets^T`` (see :func:`retriever.block_topk.topk_columns`)."""
    if history.shape[0] >= BLOCK_TOPK_MIN_LENGTH:
        return topk_columns(scores_into_buffer(targets, history, transposed=True), k)  # [B, k]
    return torch.topk(scores_into_buffer(targets, history), k, dim=1)  # [B, k]; too short for blocks


def _rerank_topk(targets: torch.Tensor, history: torch.Tensor, k: int) -> TopK:
    """Top-``k`` over a half-precision history of unit rows, all valid: a native half matrix
    product picks candidates, which are rescored exactly in float32 (see RERANK_MAX_TARGETS_CPU)."""
    m = rerank_candidates(k, history.shape[0])
    _, cand = _product_topk(targets, history, m)  # [B, m] from scores in the storage dtype
    # index_select, not history[cand]: advanced indexing of half tensors is ~1000x slower on CPU.
    rows = history.index_select(0, cand.reshape(-1)).view(*cand.shape, -1).float()  # [B, m, d]
    exact = torch.bmm(rows, targets.unsqueeze(-1)).squeeze(-1)  # [B, m, d] @ [B, d, 1] -> [B, m]
    best, j = torch.topk(exact, min(k, m), dim=1)  # [B, top]
    idx = cand.gather(1, j)  # [B, top]
    return _pad(best, idx, torch.ones_like(idx, dtype=torch.bool), k, masked=False)


def _topk_single(
    targets: torch.Tensor,
    history: torch.Tensor,
    k: int,
    valid: torch.Tensor | None,
    normalised: bool,
    history_scale: torch.Tensor | None,
    chunk_rows: int | None,
) -> TopK:
    squeeze = targets.dim() == 1
    t = targets.unsqueeze(0) if squeeze else targets  # [B, d]
    if t.dim() != 2 or t.shape[-1] != history.shape[-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} do not fit history {tuple(history.shape)} (need [B, d] and [L, d])"
        )
    mask = _valid_mask(history, valid, normalised)  # [L] or None
    t = t.to(history.device).float() if normalised else l2_normalise(t.to(history.device))  # [B, d]
    h = history
    if not normalised:
        if history_scale is not None:
            h = history.float() * history_scale.float().unsqueeze(-1)  # [L, d]
            history_scale = None
        h = l2_normalise(h)  # [L, d]
    rerank = (
        mask is None
        and h.dtype in (torch.float16, torch.bfloat16)
        and (
            h.device.type != "cpu"
            or (t.shape[0] <= RERANK_MAX_TARGETS_CPU and h.shape[0] >= RERANK_MIN_ROWS_CPU)
            or (h.shape[0] >= RERANK_MIN_ROWS_MANY_TARGETS_CPU and native_half_is_faster(h.dtype, h.device))
        )
    )
    if rerank:
        out = _rerank_topk(t, h, k)  # [B, K]
    else:
        scores = _scores_2d(t, h, history_scale, chunk_rows)  # [B, L]
        out = _finish(scores, None if mask is None else mask.unsqueeze(0), k)  # [B, K]
    if squeeze:
        return TopK(out.scores[0], out.indices[0], out.valid[0])
    return out


def _topk_batched(
    targets: torch.Tensor,
    history: torch.Tensor,
    k: int,
    valid: torch.Tensor | None,
    normalised: bool,
    history_scale: torch.Tensor | None,
) -> TopK:
    n, _, d = history.shape
    one_target = targets.dim() == 2
    t = targets.unsqueeze(1) if one_target else targets  # [N, T, d]
    if t.dim() != 3 or t.shape[0] != n or t.shape[-1] != d:
        raise ValueError(
            f"targets {tuple(targets.shape)} do not fit history {tuple(history.shape)} "
            "(need [N, d] or [N, T, d] with [N, L, d])"
        )
    mask = _valid_mask(history, valid, normalised)  # [N, L] or None
    h = history.float()  # [N, L, d]
    if history_scale is not None:
        h = h * history_scale.float().unsqueeze(-1)  # [N, L, d]
    if not normalised:
        h = l2_normalise(h)  # [N, L, d]
    t = t.to(h.device).float() if normalised else l2_normalise(t.to(h.device))  # [N, T, d]
    scores = torch.bmm(t, h.transpose(1, 2))  # [N, T, L]
    out = _finish(scores, None if mask is None else mask.unsqueeze(1), k)  # [N, T, K]
    if one_target:
        return TopK(out.scores[:, 0], out.indices[:, 0], out.valid[:, 0])  # [N, K]
    return out


def simtier_counts(scores: torch.Tensor, valid: torch.Tensor, n_tiers: int = N_TIERS) -> torch.Tensor:
    """SimTier histogram of retrieved cosine scores.

    Tier id = ``ceil(cos * 10) + 10`` clamped to ``0..n_tiers-1``; only ``valid`` scores count.
    Scores are first clamped to [-1, 1], so a self-match that rounds to ``1 + eps`` on one path
    and ``1 - eps`` on another lands in the same tier (20) on both.

    Args:
        scores: ``[..., K]`` cosine scores (e.g. :attr:`TopK.scores`).
        valid: ``[..., K]`` bool mask (e.g. :attr:`TopK.valid`).
        n_tiers: number of slots (22 in MUSE).

    Returns:
        float32 counts ``[..., n_tiers]`` (integers stored as float, ready for ``log1p``).
    """
    if tuple(scores.shape) != tuple(valid.shape):
        raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} differ in shape")
    if n_tiers < 1:
        raise ValueError(f"n_tiers must be positive, got {n_tiers}")
    cos = scores.float().clamp(-1.0, 1.0)  # [..., K]
    tiers = (torch.ceil(cos * 10.0) + 10.0).clamp_(0, n_tiers - 1).long()  # [..., K]
    counts = torch.zeros(*scores.shape[:-1], n_tiers, dtype=torch.float32, device=scores.device)
    return counts.scatter_add_(-1, tiers, valid.to(torch.float32))  # [..., n_tiers]
