"""GSU kernels against a float64 NumPy reference (CPU, no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muse.simtier import N_TIERS
from retriever.kernels import MISSING_SCORE, gsu_topk, quantise_int8, simtier_counts


def ref_topk(targets: np.ndarray, history: np.ndarray, k: int, valid: np.ndarray | None = None):
    """float64 reference: cosine, missing/zero rows at -1.1, stable descending order, padded to k."""
    t = targets.astype(np.float64)
    h = history.astype(np.float64)
    tn = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-300)
    hn_norm = np.linalg.norm(h, axis=-1, keepdims=True)
    hn = h / np.where(hn_norm > 0, hn_norm, 1.0)
    ok = hn_norm[:, 0] > 0
    if valid is not None:
        ok &= valid
    s = tn @ hn.T  # [B, L]
    s[:, ~ok] = MISSING_SCORE
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(s, order, axis=1)
    v = scores > MISSING_SCORE
    pad = k - order.shape[1]
    if pad > 0:
        order = np.pad(order, ((0, 0), (0, pad)))
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=MISSING_SCORE)
        v = np.pad(v, ((0, 0), (0, pad)))
    return scores, order, v


def ref_simtier(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(scores.shape[:-1] + (N_TIERS,))
    for idx in np.ndindex(scores.shape):
        if valid[idx]:
            tier = min(max(math.ceil(float(scores[idx]) * 10) + 10, 0), N_TIERS - 1)
            out[idx[:-1] + (tier,)] += 1
    return out


def _assert_matches(got, scores, order, valid, atol=1e-5):
    np.testing.assert_array_equal(got.valid.numpy(), valid)
    np.testing.assert_allclose(got.scores.numpy(), scores, atol=atol)
    # Indices agree wherever the reference scores are distinct (no tie inside the top-k).
    np.testing.assert_array_equal(got.indices.numpy()[valid], order[valid])


@pytest.mark.parametrize("length,k", [(1, 1), (37, 5), (500, 50), (20, 50)])
def test_topk_matches_reference_on_random_data(length: int, k: int) -> None:
    rng = np.random.default_rng(length)
    history = (rng.normal(size=(length, 16)) * rng.uniform(0.5, 3, size=(length, 1))).astype(np.float32)
    targets = rng.normal(size=(4, 16)).astype(np.float32)
    got = gsu_topk(torch.from_numpy(targets), torch.from_numpy(history), k)
    assert got.scores.shape == (4, k) and got.scores.dtype == torch.float32
    _assert_matches(got, *ref_topk(targets, history, k))


def test_padding_and_missing_vectors_rank_last_and_k_beyond_history() -> None:
    rng = np.random.default_rng(1)
    history = rng.normal(size=(30, 8)).astype(np.float32)
    history[[3, 7, 11]] = 0.0  # behaviours without a vector
    valid = np.ones(30, dtype=bool)
    valid[25:] = False  # padding
    # Make the padding rows the most similar of all, so a wrong mask would surface them first.
    targets = rng.normal(size=(3, 8)).astype(np.float32)
    history[25:] = targets[0] * 5
    got = gsu_topk(torch.from_numpy(targets), torch.from_numpy(history), 40, torch.from_numpy(valid))
    scores, order, v = ref_topk(targets, history, 40, valid)
    _assert_matches(got, scores, order, v)
    assert got.valid.sum(dim=1).tolist() == [22, 22, 22]  # 30 - 3 missing - 5 padding
    returned = set(got.indices[0][got.valid[0]].tolist())
    assert returned.isdisjoint({3, 7, 11, 25, 26, 27, 28, 29})
    assert torch.all(got.scores[:, 22:] == MISSING_SCORE)
    assert torch.all(got.indices[:, 30:] == 0)


def test_ties_return_the_tied_scores() -> None:
    base = np.eye(4, dtype=np.float32)
    history = np.concatenate([base[[0]]] * 6 + [base[[1]]] * 4)  # six identical best rows
    targets = base[[0]]
    got = gsu_topk(torch.from_numpy(targets), torch.from_numpy(history), 3)
    assert got.scores[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert set(got.indices[0].tolist()) <= set(range(6))
    assert len(set(got.indices[0].tolist())) == 3


@pytest.mark.parametrize("with_targets_axis", [False, True])
def test_batched_matches_per_row_reference(with_targets_axis: bool) -> None:
    rng = np.random.default_rng(2)
    n, length, d, k = 5, 64, 12, 10
    history = rng.normal(size=(n, length, d)).astype(np.float32)
    lengths = [64, 3, 0, 40, 12]
    valid = np.arange(length)[None, :] < np.array(lengths)[:, None]
    history[~valid] = rng.normal(size=(int((~valid).sum()), d))  # garbage in the padding
    history[3, 5] = 0.0  # a missing vector inside a real history
    targets = rng.normal(size=(n, 2, d) if with_targets_axis else (n, d)).astype(np.float32)
    got = gsu_topk(torch.from_numpy(targets), torch.from_numpy(history), k, torch.from_numpy(valid))
    for i in range(n):
        t = targets[i] if with_targets_axis else targets[i : i + 1]
        scores, order, v = ref_topk(t, history[i], k, valid[i])
        sl = i if with_targets_axis else slice(i, i + 1)
        s_i, i_i, v_i = got.scores[sl].numpy(), got.indices[sl].numpy(), got.valid[sl].numpy()
        np.testing.assert_array_equal(v_i, v)
        np.testing.assert_allclose(s_i, scores, atol=1e-5)
        np.testing.assert_array_equal(i_i[v], order[v])
    assert got.valid[2].sum() == 0  # an empty history returns nothing valid


@pytest.mark.parametrize("n_targets", [8, 40])  # rerank on CPU up to 16 targets; above, AMX decides
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_compressed_storage_close_to_float32(dtype: torch.dtype, n_targets: int) -> None:
    rng = np.random.default_rng(3)
    history = rng.normal(size=(5000, 32)).astype(np.float32)  # >= RERANK_MIN_ROWS_CPU
    history /= np.linalg.norm(history, axis=1, keepdims=True)
    targets = rng.normal(size=(n_targets, 32)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)  # normalised=True covers both sides
    h = torch.from_numpy(history)
    scale = None
    if dtype == torch.int8:
        stored, scale = quantise_int8(h)
    else:
        stored = h.to(dtype)
    got = gsu_topk(
        torch.from_numpy(targets), stored, 20, normalised=True, history_scale=scale, chunk_rows=700
    )
    scores, order, _ = ref_topk(targets, history, 20)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.int8: 1e-2}[dtype]
    np.testing.assert_allclose(got.scores.numpy(), scores, atol=tol)
    recall = np.mean(
        [len(set(got.indices[b].tolist()) & set(order[b].tolist())) / 20 for b in range(n_targets)]
    )
    assert recall >= 0.9
    # Unnormalised compressed input goes through the normalising path and agrees as well.
    again = gsu_topk(torch.from_numpy(targets), stored, 20, history_scale=scale)
    np.testing.assert_allclose(again.scores.numpy(), got.scores.numpy(), atol=tol)
    # k beyond the history pads on every path.
    short = gsu_topk(
        torch.from_numpy(targets),
        stored[:5],
        9,
        normalised=True,
        history_scale=None if scale is None else scale[:5],
    )
    assert short.valid.sum(dim=1).tolist() == [5] * n_targets and torch.all(
        short.scores[:, 5:] == MISSING_SCORE
    )


def test_simtier_matches_reference_and_ignores_invalid() -> None:
    rng = np.random.default_rng(4)
    scores = rng.uniform(-1, 1, size=(3, 4, 50)).astype(np.float32)
    valid = rng.uniform(size=scores.shape) > 0.3
    got = simtier_counts(torch.from_numpy(scores), torch.from_numpy(valid))
    assert got.shape == (3, 4, N_TIERS)
    np.testing.assert_array_equal(got.numpy(), ref_simtier(scores, valid))
    np.testing.assert_array_equal(got.sum(-1).numpy(), valid.sum(-1))


def test_simtier_edges() -> None:
    s = torch.tensor([[-1.0, -0.95, 0.0, 0.05, 0.5, 1.0, MISSING_SCORE]])
    v = torch.tensor([[True] * 6 + [False]])
    counts = simtier_counts(s, v)[0]
    expected = torch.zeros(N_TIERS)
    for tier in (0, 1, 10, 11, 15, 20):
        expected[tier] += 1
    assert torch.equal(counts, expected)


def test_topk_then_simtier_pipeline() -> None:
    rng = np.random.default_rng(5)
    history = rng.normal(size=(200, 16)).astype(np.float32)
    targets = rng.normal(size=(2, 16)).astype(np.float32)
    top = gsu_topk(torch.from_numpy(targets), torch.from_numpy(history), 50)
    scores, _, v = ref_topk(targets, history, 50)
    np.testing.assert_array_equal(simtier_counts(top.scores, top.valid).numpy(), ref_simtier(scores, v))


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "5"])
def test_bad_k_raises_value_error(k) -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        gsu_topk(torch.ones(1, 4), torch.ones(3, 4), k)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        gsu_topk(torch.ones(2, 5), torch.ones(3, 4), 1)
    with pytest.raises(ValueError, match="valid has shape"):
        gsu_topk(torch.ones(2, 4), torch.ones(3, 4), 1, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="history_scale"):
        gsu_topk(torch.ones(2, 4), torch.ones(3, 4, dtype=torch.int8), 1)
    with pytest.raises(ValueError, match="differ in shape"):
        simtier_counts(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


def test_batched_normalised_input_skips_normalisation_and_agrees() -> None:
    """The ranker's fast path: unit vectors, missing behaviours only in ``valid`` (one bmm + topk)."""
    rng = np.random.default_rng(6)
    n, length, d = 4, 30, 8
    history = rng.normal(size=(n, length, d)).astype(np.float32)
    history /= np.linalg.norm(history, axis=-1, keepdims=True)
    valid = rng.uniform(size=(n, length)) > 0.2
    targets = rng.normal(size=(n, d)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=-1, keepdims=True)
    h, v, t = torch.from_numpy(history), torch.from_numpy(valid), torch.from_numpy(targets)
    fast = gsu_topk(t, h, 12, v, normalised=True)
    slow = gsu_topk(t * 3.0, h * 2.0, 12, v)
    assert torch.equal(fast.valid, slow.valid) and torch.equal(
        fast.indices[fast.valid], slow.indices[slow.valid]
    )
    torch.testing.assert_close(fast.scores, slow.scores, atol=1e-6, rtol=0)
    for i in range(n):
        scores, order, ok = ref_topk(targets[i : i + 1], history[i], 12, valid[i])
        np.testing.assert_array_equal(fast.indices[i].numpy()[ok[0]], order[0][ok[0]])


def test_simtier_self_match_rounding_lands_in_one_tier():
    """A cosine of 1 +/- one rounding step (self-match on different paths) counts in tier 20."""
    scores = torch.tensor([[1.0 + 1e-6, 1.0 - 1e-7, 1.0]])
    counts = simtier_counts(scores, torch.ones_like(scores, dtype=torch.bool))
    assert counts[0, 20].item() == 3 and counts[0, 21].item() == 0
