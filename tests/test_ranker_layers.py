"""Behaviour of the ranker's layers on random tensors (CPU, no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muse.errors import ConfigurationError
from ranker.layers import (
    Dice,
    DinAttention,
    DotProductTargetAttention,
    MLPTower,
    SemanticAwareTargetAttention,
    SimTier,
    masked_softmax,
)

B, L, E = 4, 7, 8


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(B, E, generator=g)
    seq = torch.randn(B, L, E, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[0] = False  # a user with no valid behaviour
    mask[1, 0] = True
    sim = torch.rand(B, L, generator=g) * 2 - 1
    return target, seq, mask, sim


def test_simtier_counts_equal_numpy_histogram() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(5, 50, generator=g) * 2 - 1
    scores[0, :3] = torch.tensor([-1.0, 1.0, 0.0])  # edges of the tier grid
    valid = torch.rand(5, 50, generator=g) > 0.2
    layer = SimTier()
    counts = layer.counts(scores, valid).numpy()
    s, v = scores.numpy(), valid.numpy()
    for row in range(5):
        tiers = np.ceil(s[row][v[row]].astype(np.float64) * 10) + 10
        expected, _ = np.histogram(tiers, bins=np.arange(23) - 0.5)
        np.testing.assert_array_equal(counts[row], expected)
    # the features are log(count + 1) times the per-tier weights
    with torch.no_grad():
        layer.weight.copy_(torch.arange(22, dtype=torch.float32))
    np.testing.assert_allclose(layer(scores, valid).detach().numpy(), np.log1p(counts) * np.arange(22), rtol=1e-6)


def test_masked_softmax_gives_zero_weight_to_masked(inputs) -> None:
    _, _, mask, sim = inputs
    w = masked_softmax(sim * 10, mask)
    assert torch.all(w[~mask] == 0)
    assert torch.all(w[0] == 0)  # no valid position: zeros, not NaN
    np.testing.assert_allclose(w[1:].sum(-1).numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("layer_cls", [DotProductTargetAttention, DinAttention])
def test_attention_masked_positions_get_zero_weight(layer_cls, inputs) -> None:
    target, seq, mask, _ = inputs
    layer = layer_cls(E)
    out, w = layer(target, seq, mask, return_weights=True)
    assert out.shape == (B, layer.out_dim)
    assert torch.all(w[~mask] == 0)
    assert torch.all(out[0] == 0) if layer_cls is DinAttention else torch.isfinite(out).all()
    # changing a masked behaviour must not change the output
    seq2 = seq.clone()
    seq2[~mask] = 100.0
    torch.testing.assert_close(layer(target, seq2, mask), out)


def test_dot_product_attention_matches_reference(inputs) -> None:
    target, seq, mask, _ = inputs
    layer = DotProductTargetAttention(E, 6)
    q = torch.nn.functional.silu(layer.query[0](target))
    k = torch.nn.functional.silu(layer.key[0](seq))
    v = torch.nn.functional.silu(layer.value[0](seq))
    expected = []
    for b in range(B):
        logits = (k[b] @ q[b]) / math.sqrt(6)
        logits[~mask[b]] = -float("inf")
        w = torch.softmax(logits, 0) if mask[b].any() else torch.zeros(L)
        expected.append(w @ v[b])
    torch.testing.assert_close(layer(target, seq, mask), torch.stack(expected))


def test_sata_with_g2_g3_zero_equals_target_attention(inputs) -> None:
    target, seq, mask, sim = inputs
    sata = SemanticAwareTargetAttention(E)
    with torch.no_grad():
        sata.gates.copy_(torch.tensor([1.0, 0.0, 0.0]))
    plain = sata.attention(target, seq, mask)  # the same projections, no similarity
    torch.testing.assert_close(sata(target, seq, sim, mask), plain)
    with torch.no_grad():
        sata.gates.copy_(torch.tensor([1.0, 1.0, 1.0]))
    assert not torch.allclose(sata(target, seq, sim, mask)[1:], plain[1:])  # the similarity now matters


def test_sata_fusion_formula(inputs) -> None:
    target, seq, _, sim = inputs
    sata = SemanticAwareTargetAttention(E, temperature=0.5)
    with torch.no_grad():
        sata.gates.copy_(torch.tensor([0.3, 2.0, -1.5]))
    alpha = sata.attention.logits(target, seq)
    r = sim / 0.5
    torch.testing.assert_close(sata.fused_logits(target, seq, sim), 0.3 * alpha + 2.0 * r - 1.5 * alpha * r)


def test_dice_interpolates_between_identity_and_alpha() -> None:
    dice = Dice(3).eval()  # eval: BatchNorm uses running stats (mean 0, var 1) -> p = sigmoid(x)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.5, 1.0]))
    x = torch.tensor([[2.0, -1.0, 3.0]])
    p = torch.sigmoid(x)
    expected = p * x + (1 - p) * dice.alpha * x
    torch.testing.assert_close(dice(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(dice(x)[0, 2], x[0, 2], atol=1e-4)  # alpha = 1 is the identity


def test_mlp_tower_rejects_unknown_activation() -> None:
    with pytest.raises(ConfigurationError, match="swish"):
        MLPTower(4, (8,), activation="swish")


@pytest.mark.parametrize("activation", ["dice", "relu", "prelu"])
def test_gradients_reach_every_parameter(activation, inputs) -> None:
    target, seq, mask, sim = inputs
    mask = mask.clone()
    mask[:, 0] = True
    sata, din, simtier = SemanticAwareTargetAttention(E), DinAttention(E), SimTier()
    tower = MLPTower(sata.out_dim + din.out_dim + simtier.out_dim, (16, 8), activation)
    feats = torch.cat([sata(target, seq, sim, mask), din(target, seq, mask), simtier(sim, mask)], -1)
    tower(feats).sum().backward()
    for module in (sata, din, simtier, tower):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
