"""Unit tests of the contrastive losses and the recall kernel (small tensors, no data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from indexer.evaluation import rank_hits
from indexer.losses import ClipLoss, QueueInfoNCE, hard_negative_triplet
from muse.errors import ConfigurationError


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_clip_loss_matches_reference_and_prefers_aligned_pairs() -> None:
    a, b = _unit(8, 16, seed=1), _unit(8, 16, seed=2)
    loss = ClipLoss(temperature=0.1)
    logits = a @ b.T / 0.1
    ref = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    assert torch.allclose(loss(a, b), ref)
    assert loss(a, a) < loss(a, b)  # perfectly aligned pairs score lower


def test_queue_infonce_uses_queue_and_masks_same_items() -> None:
    crit = QueueInfoNCE(dim=16, queue_size=6, temperature=0.1)
    q, k = _unit(4, 16, seed=3), _unit(4, 16, seed=4)
    first = crit(q, k, torch.arange(4))
    # First call: in-batch negatives only, equal to plain CE over q @ k.T.
    assert torch.allclose(first, F.cross_entropy(q @ k.T / 0.1, torch.arange(4)))
    assert int(crit.filled) == 4
    second = crit(q, k, torch.arange(4))
    # Second call: the 4 queued keys are negatives too, except each row's own positive item.
    queued = (q @ k.T).masked_fill(torch.eye(4, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(torch.cat([q @ k.T, queued], dim=1) / 0.1, torch.arange(4))
    assert torch.allclose(second, ref)
    assert second > first
    assert int(crit.filled) == 6 and int(crit.ptr) == 2  # FIFO wrap-around
    assert crit.queue_ids.tolist() == [2, 3, 2, 3, 0, 1]  # slots 4, 5, 0, 1 overwritten


def test_queue_infonce_masks_the_query_item_itself() -> None:
    crit = QueueInfoNCE(dim=8, queue_size=0, temperature=0.1)
    x = _unit(3, 8, seed=5)
    # Row 0 (item 7) has positive item 8; row 1's key *is* item 7 -> must not be a negative of row 0.
    k = torch.stack([x[1], x[0], x[2]])
    masked = crit(x, k, key_ids=torch.tensor([8, 7, 9]), query_ids=torch.tensor([7, 8, 5]))
    unmasked = crit(x, k, key_ids=torch.tensor([8, 7, 9]))
    assert masked < unmasked


def test_hard_negative_triplet_hinge_and_padding() -> None:
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # one easy negative, one identical to the positive
    only_easy = hard_negative_triplet(q, pos, neg, torch.tensor([[1.0, 0.0]]), margin=0.2)
    both = hard_negative_triplet(q, pos, neg, torch.tensor([[1.0, 1.0]]), margin=0.2)
    assert only_easy.item() == 0.0  # cos gap 1.0 > margin
    assert math.isclose(both.item(), 0.1, rel_tol=1e-6)  # (0 + 0.2) / 2 valid negatives
    assert hard_negative_triplet(q, pos, neg, torch.zeros(1, 2)).item() == 0.0


def test_bad_temperature_and_queue_rejected() -> None:
    with pytest.raises(ConfigurationError, match="temperature=0"):
        ClipLoss(temperature=0)
    with pytest.raises(ConfigurationError, match="queue_size=-1"):
        QueueInfoNCE(dim=4, queue_size=-1)


def test_rank_hits_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((50, 8)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:10] + 0.01
    valid = np.ones(50, bool)
    valid[3] = False
    targets = np.arange(10)
    hits = rank_hits(queries, corpus, valid, targets, k=1)
    expected = np.array([i != 3 for i in range(10)])  # an invalid row never ranks
    np.testing.assert_array_equal(hits, expected)
    # Excluding the query's own row moves the target out of the top 1.
    assert not rank_hits(queries, corpus, valid, targets, k=1, exclude=np.arange(10)).any()
    assert not rank_hits(queries, corpus, valid, np.full(10, -1), k=50).any()  # absent targets miss


def test_queued_stale_copies_of_the_positive_are_masked() -> None:
    crit = QueueInfoNCE(dim=16, queue_size=3, temperature=0.1)
    q, k = _unit(2, 16, seed=6), _unit(2, 16, seed=7)
    stale = _unit(1, 16, seed=8)
    for _ in range(3):  # the queue now holds three out-of-date vectors of item 5
        crit(stale, stale, key_ids=torch.tensor([5]))
    assert crit.queue_ids.tolist() == [5, 5, 5]
    per_row = F.cross_entropy(
        torch.cat([q @ k.T, q @ crit.queue.T], dim=1) / 0.1, torch.arange(2), reduction="none"
    )
    loss = crit(q, k, key_ids=torch.tensor([5, 9]))  # row 0's positive is item 5, row 1's is item 9
    in_batch_row0 = F.cross_entropy(q[:1] @ k.T / 0.1, torch.tensor([0]))
    # Row 0 sees only in-batch negatives; row 1 keeps the queued item-5 keys as negatives.
    assert torch.allclose(loss, (in_batch_row0 + per_row[1]) / 2)


def test_queue_size_is_capped_below_the_number_of_pairs(caplog: pytest.LogCaptureFixture) -> None:
    from indexer.training import QUEUE_MAX_SHARE, TrainConfig, effective_queue_size

    assert TrainConfig().queue_size == 0  # in-batch negatives by default
    with caplog.at_level("WARNING", logger="indexer.training"):
        assert effective_queue_size(4096, 3316, "scl") == int(3316 * QUEUE_MAX_SHARE) < 3316
    assert "queue_size=4096" in caplog.text and "3316 training pairs" in caplog.text
    caplog.clear()
    assert effective_queue_size(256, 3316) == 256
    assert caplog.text == ""
    with pytest.raises(ConfigurationError, match="queue_size=-2"):
        effective_queue_size(-2, 100)
