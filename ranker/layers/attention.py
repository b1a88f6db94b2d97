"""Target attention over a behaviour sequence: dot-product (TA) and the DIN activation unit.

Both take a target representation ``[B, E]``, a sequence ``[B, L, E]`` and a validity mask
``[B, L]`` (True = a real behaviour) and return the pooled sequence ``[B, out_dim]``. Masked
positions get exactly zero weight; a row with no valid position pools to zeros.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Added to the logits of masked positions before the softmax (finite, so no NaN on empty rows).
MASK_LOGIT = -1e9


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis that gives masked positions (``mask`` False) exactly zero weight.

    Args:
        logits: ``[..., L]`` attention logits.
        mask: ``[..., L]`` bool, True where the position is real.

    Returns:
        ``[..., L]`` weights summing to 1 over the valid positions (all zeros where none is valid).
    """
    weights = torch.softmax(logits.masked_fill(~mask, MASK_LOGIT), dim=-1)  # [..., L]
    return weights * mask  # rows with no valid position: uniform * 0 = 0


def masked_mean(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``seq [B, L, E]`` over the valid positions of ``mask [B, L]`` -> ``[B, E]`` (zeros if none)."""
    m = mask.unsqueeze(-1).to(seq.dtype)  # [B, L, 1]
    total = (seq * m).sum(dim=1)  # [B, E]
    count = m.sum(dim=1).clamp_min(1.0)  # [B, 1]
    return total / count


class DotProductTargetAttention(nn.Module):
    """Single-head dot-product target attention with Linear + SiLU projections for Q, K and V.

    ``alpha = (seq W_k) . (target W_q) / sqrt(dim)``, ``out = softmax(alpha) (seq W_v)``.
    :meth:`logits` and :meth:`values` are public so SA-TA and TWIN's search can reuse them.
    """

    def __init__(self, in_dim: int, dim: int | None = None, scale: bool = True) -> None:
        super().__init__()
        dim = dim or in_dim
        self.in_dim = in_dim
        self.out_dim = dim
        self.query = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU())
        self.key = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU())
        self.value = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU())
        self.scale = 1.0 / math.sqrt(dim) if scale else 1.0

    def logits(self, target: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Attention logits ``[B, L]`` of ``target [B, E]`` over ``seq [B, L, E]`` (before masking)."""
        q = self.query(target)  # [B, d]
        k = self.key(seq)  # [B, L, d]
        return torch.einsum("bld,bd->bl", k, q) * self.scale  # [B, L]

    def values(self, seq: torch.Tensor) -> torch.Tensor:
        """Projected values ``[B, L, d]`` of ``seq [B, L, E]``."""
        return self.value(seq)

    def pool(self, weights: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """``weights [B, L]`` times the values of ``seq [B, L, E]`` -> ``[B, d]``."""
        return torch.einsum("bl,bld->bd", weights, self.values(seq))

    def forward(
        self, target: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weights = masked_softmax(self.logits(target, seq), mask)  # [B, L]
        out = self.pool(weights, seq)  # [B, d]
        return (out, weights) if return_weights else out


class DinAttention(nn.Module):
    """DIN's activation unit: an MLP on ``[q, k, q - k, q * k]`` scores each behaviour.

    The scores are normalised with a masked softmax (as FuxiCTR's ``use_softmax`` option) and
    pool the raw behaviour embeddings, so ``out_dim`` equals ``in_dim``.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (80, 40)) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = in_dim
        layers: list[nn.Module] = []
        width = 4 * in_dim  # [q, k, q - k, q * k]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Sigmoid()]
            width = h
        layers.append(nn.Linear(width, 1, bias=False))  # a bias would cancel in the softmax
        self.unit = nn.Sequential(*layers)

    def logits(self, target: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Activation-unit scores ``[B, L]``."""
        q = target.unsqueeze(1).expand_as(seq)  # [B, L, E]
        feats = torch.cat([q, seq, q - seq, q * seq], dim=-1)  # [B, L, 4E]
        return self.unit(feats).squeeze(-1)  # [B, L]

    def forward(
        self, target: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weights = masked_softmax(self.logits(target, seq), mask)  # [B, L]
        out = torch.einsum("bl,ble->be", weights, seq)  # [B, E]
        return (out, weights) if return_weights else out
