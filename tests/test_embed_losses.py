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
    from indexer.training import QUEUE_MAX_SHARE, EmbedTrainConfig, effective_queue_size

    assert EmbedTrainConfig().queue_size == 0  # in-batch negatives by default
    with caplog.at_level("WARNING", logger="indexer.training"):
        assert effective_queue_size(4096, 3316, "scl") == int(3316 * QUEUE_MAX_SHARE) < 3316
    assert "queue_size=4096" in caplog.text and "3316 training pairs" in caplog.text
    caplog.clear()
    assert effective_queue_size(256, 3316) == 256
    assert caplog.text == ""
    with pytest.raises(ConfigurationError, match="queue_size=-2"):
        effective_queue_size(-2, 100)


def test_augment_images_keeps_shape_range_and_hue_and_is_seeded() -> None:
    from indexer.training import augment_images

    x = torch.zeros(4, 3, 16, 16)
    x[:, 0, 4:12, 4:12] = 0.8  # a red square on black
    x[:, 1, 4:12, 4:12] = 0.2
    a = augment_images(x, torch.Generator().manual_seed(0))
    b = augment_images(x, torch.Generator().manual_seed(0))
    c = augment_images(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0.0 and a.max() <= 1.0
    torch.testing.assert_close(a, b)  # same seed, same views
    assert not torch.allclose(a, c) and not torch.allclose(a, x)  # other seed, other views; not a no-op
    ratio = a[:, 1].sum(dim=(1, 2)) / a[:, 0].sum(dim=(1, 2))  # bilinear mixing with black keeps the hue
    torch.testing.assert_close(ratio, torch.full((4,), 0.25), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a[0], a[1])  # each image of the batch gets its own view


def test_momentum_key_encoder_is_an_ema_of_the_online_weights() -> None:
    from indexer.training import MomentumKeyEncoder

    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    keys = MomentumKeyEncoder(online, momentum=0.9)
    assert all(not p.requires_grad for p in keys.model.parameters())
    before = [p.detach().clone() for p in keys.model.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online.train()
    online(torch.randn(8, 4))  # moves the BatchNorm running statistics
    keys.update()
    for k, old, q in zip(keys.model.parameters(), before, online.parameters()):
        torch.testing.assert_close(k, 0.9 * old + 0.1 * q.detach())
    torch.testing.assert_close(keys.model[1].running_mean, online[1].running_mean)  # buffers copied
    with pytest.raises(ConfigurationError, match="momentum=1.0"):
        MomentumKeyEncoder(online, momentum=1.0)


def test_train_config_fills_source_defaults() -> None:
    from indexer.training import EmbedTrainConfig

    i2i = EmbedTrainConfig().for_source("i2i")
    assert (i2i.temperature, i2i.augment, i2i.view_weight) == (0.2, True, 0.5)
    scl = EmbedTrainConfig().for_source("scl")
    assert (scl.temperature, scl.augment, scl.view_weight, scl.epochs) == (0.07, False, 0.0, 8)
    assert EmbedTrainConfig().for_source("openclip").epochs == 2 and EmbedTrainConfig(epochs=3).for_source("scl").epochs == 3
    mine = EmbedTrainConfig(temperature=0.5, augment=False, view_weight=0.0).for_source("i2i")
    assert (mine.temperature, mine.augment, mine.view_weight) == (0.5, False, 0.0)  # explicit values win
    assert EmbedTrainConfig(view_weight=0.3).for_source("openclip").augment is True  # the view term needs views
    with pytest.raises(ConfigurationError, match="needs augment"):
        EmbedTrainConfig(view_weight=0.3, augment=False)
    with pytest.raises(ConfigurationError, match="momentum=-0.1"):
        EmbedTrainConfig(momentum=-0.1)
