"""SimTier: a histogram of GSU similarities as features.

[-1, 1] is split into tiers of width 0.1 with ``tier = ceil(cos * 10) + 10`` (22 slots, 21
reachable, as in the release); the count of valid behaviours in each tier becomes
``log(count + 1) * w_tier`` with one learned weight per tier, initialised uniformly in (0, 1) as in
the release (or at a constant). The counts come from the retriever's
kernel (:func:`retriever.kernels.simtier_counts`) so training and serving bin identically.
"""

from __future__ import annotations

import torch
from torch import nn

from muse.simtier import N_TIERS


class SimTier(nn.Module):
    """``scores [B, K]`` + ``mask [B, K]`` -> ``log(count + 1) * w`` of shape ``[B, n_tiers]``."""

    def __init__(self, n_tiers: int = N_TIERS, init: float | str = "uniform") -> None:
        super().__init__()
        self.n_tiers = n_tiers
        self.out_dim = n_tiers
        if init == "uniform":  # as the release: each tier's weight drawn from U(0, 1)
            weight = torch.rand(n_tiers)
        else:
            weight = torch.full((n_tiers,), float(init))
        self.weight = nn.Parameter(weight)

    def counts(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tier counts ``[B, n_tiers]`` (float) of the valid scores."""
        from retriever.kernels import simtier_counts

        # clamp: a self-match scores 1 +- 1 ulp depending on the path (cache, Milvus, batch), and
        # ceil() would put 1 + 1ulp into the spare tier 21 instead of 20
        cos = scores.detach().clamp(-1.0, 1.0)
        return simtier_counts(cos, mask, n_tiers=self.n_tiers).to(scores.dtype)

    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.counts(scores, mask)) * self.weight  # [B, n_tiers]
