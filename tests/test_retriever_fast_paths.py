"""The GSU hot path's pieces: two-stage block top-k, reused score buffers, the half-precision choice."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from retriever import block_topk, kernels, score_products
from retriever.block_topk import topk_columns, topk_rows
from retriever.kernels import MISSING_SCORE, gsu_topk
from retriever.score_products import native_half_is_faster, score_buffer, scores_into_buffer


def both_layouts(scores: torch.Tensor, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two-stage top-k of ``scores [B, L]`` from rows and from the ``[L, B]`` column layout."""
    return [topk_rows(scores, k), topk_columns(scores.T.contiguous(), k)]


@pytest.mark.parametrize("length", [block_topk.MIN_LENGTH, 50_000, 50_000 + 37])
@pytest.mark.parametrize("k", [1, 50])
def test_block_topk_equals_torch_topk(length: int, k: int) -> None:
    gen = torch.Generator().manual_seed(length + k)
    scores = torch.randn(7, length, generator=gen)
    # Put the row's winners in one block, in the tail, and at both ends, where a wrong split loses them.
    scores[0, 64:64 + k] = 10.0 + torch.arange(k, dtype=torch.float32)
    scores[1, -k:] = 20.0 + torch.arange(k, dtype=torch.float32)
    scores[2, 0] = 30.0
    ref_values, ref_idx = torch.topk(scores, k, dim=1)
    for values, idx in both_layouts(scores, k):
        assert torch.equal(values, ref_values)
        assert torch.equal(idx, ref_idx)


def test_block_topk_with_ties_and_masked_rows_returns_tied_values() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.round(torch.rand(4, 40_000, generator=gen) * 20) / 20  # 21 distinct values: many ties
    scores[3, 1000:] = MISSING_SCORE  # a short history padded to the batch length
    ref_values, _ = torch.topk(scores, 50, dim=1)
    for values, idx in both_layouts(scores, 50):
        assert torch.equal(values, ref_values)
        assert torch.equal(scores.gather(1, idx), values)  # indices point at the values they report
        assert all(len(set(row.tolist())) == 50 for row in idx)  # no index twice


def test_block_topk_with_mostly_negative_rows_is_exact_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block maxima are compared as integers, exact only for blocks holding a score >= 0: a row with
    fewer than k such blocks takes the plain ``torch.topk``; enough of them, the two stages."""
    full_rows: list[int] = []
    real_topk = torch.topk

    def spy(x: torch.Tensor, k: int, *args, **kwargs):  # noqa: ANN002, ANN003
        if x.shape[-1] == 40_000:
            full_rows.append(x.shape[0])
        return real_topk(x, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for n_positive, two_stage in ((0, False), (40, False), (80, True)):
            scores = -torch.rand(2, 40_000, generator=gen).to(dtype)  # negative everywhere ...
            scores[:, : 7 * n_positive : 7] = torch.rand(2, n_positive, generator=gen).to(dtype)  # ... but here
            for layout, (values, idx) in enumerate(both_layouts(scores, 50)):
                assert torch.equal(values, real_topk(scores, 50, dim=1).values), (dtype, n_positive, layout)
                assert torch.equal(scores.gather(1, idx), values)
            full_rows.clear()
            topk_rows(scores, 50)
            topk_columns(scores.T.contiguous(), 50)
            assert (full_rows == []) == two_stage, (dtype, n_positive)


def test_block_topk_on_bfloat16_scores() -> None:
    scores = torch.randn(3, 30_000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref_values, _ = torch.topk(scores, 20, dim=1)
    for values, idx in both_layouts(scores, 20):
        assert values.dtype == torch.bfloat16 and torch.equal(values, ref_values)
        assert torch.equal(scores.gather(1, idx), values)


def test_score_buffer_is_reused_per_thread_and_results_do_not_alias_it() -> None:
    a = score_buffer(10, 1000, torch.float32, torch.device("cpu"))
    b = score_buffer(5, 100, torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr()  # the same storage, reused
    other: list[int] = []
    thread = threading.Thread(
        target=lambda: other.append(score_buffer(10, 1000, torch.float32, torch.device("cpu")).data_ptr())
    )
    thread.start()
    thread.join()
    assert other[0] != a.data_ptr()  # another thread gets its own
    huge_cols = score_products.MAX_BUFFER_BYTES // 4 + 1
    assert score_buffer(1, huge_cols, torch.float32, torch.device("cpu")).data_ptr() != a.data_ptr()

    gen = torch.Generator().manual_seed(2)
    history = torch.nn.functional.normalize(torch.randn(20_000, 16, generator=gen), dim=1)
    t1 = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    t2 = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    np.testing.assert_allclose(scores_into_buffer(t1, history).numpy(), (t1 @ history.T).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        scores_into_buffer(t1, history, transposed=True).numpy(), (history @ t1.T).numpy(), atol=1e-6
    )
    first = gsu_topk(t1, history, 10, normalised=True)
    kept = first.scores.clone(), first.indices.clone()
    gsu_topk(t2, history, 10, normalised=True)  # overwrites the buffer
    assert torch.equal(first.scores, kept[0]) and torch.equal(first.indices, kept[1])
    ref = torch.topk(t1 @ history.T, 10, dim=1)
    assert torch.equal(first.indices, ref.indices)


def test_native_half_choice_is_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(score_products, "_half_choice", {})
    monkeypatch.setattr(score_products, "CALIBRATION_SHAPE", (8, 512, 16))
    calls: list[int] = []
    real = score_products._median_ms
    monkeypatch.setattr(score_products, "_median_ms", lambda fn, reps=5: calls.append(1) or real(fn, reps))
    first = native_half_is_faster(torch.bfloat16, "cpu")
    assert isinstance(first, bool) and len(calls) == 2  # native and float32 timed once each
    assert native_half_is_faster(torch.bfloat16, "cpu") is first and len(calls) == 2
    assert native_half_is_faster(torch.bfloat16, "meta") is True  # accelerators: always native


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_targets_over_half_history_agree_on_both_product_paths(
    native: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 targets (above RERANK_MAX_TARGETS_CPU): the native-half + rescoring path (AMX CPUs) and
    the float32 up-cast path give the float64 reference's top-k."""
    monkeypatch.setattr(score_products, "_half_choice", {("cpu", dtype): native})
    used: list[bool] = []
    real_rerank = kernels._rerank_topk
    monkeypatch.setattr(kernels, "_rerank_topk", lambda *a: used.append(True) or real_rerank(*a))
    rng = np.random.default_rng(5)
    history = rng.normal(size=(kernels.RERANK_MIN_ROWS_MANY_TARGETS_CPU + 1000, 32))
    history /= np.linalg.norm(history, axis=1, keepdims=True)
    targets = rng.normal(size=(40, 32))
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    stored = torch.from_numpy(history).to(dtype)
    got = gsu_topk(torch.from_numpy(targets).float(), stored, 50, normalised=True)
    exact = targets @ stored.double().numpy().T  # what the stored (rounded) rows score exactly
    ref = np.argsort(-exact, axis=1)[:, :50]
    recall = np.mean([len(set(g) & set(r)) / 50 for g, r in zip(got.indices.tolist(), ref.tolist())])
    assert recall >= 0.995
    assert used == ([True] if native else [])  # the path the half-product choice asks for
    np.testing.assert_allclose(
        got.scores.numpy(), np.take_along_axis(exact, got.indices.numpy(), axis=1), atol=1e-5
    )
