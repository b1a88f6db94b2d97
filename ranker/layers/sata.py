"""Semantic-aware target attention (SA-TA), the ESU attention of MUSE.

``alpha_ID = (E_u W_k)(e_a W_q)^T / sqrt(d)`` is plain dot-product target attention on the ID
embeddings; ``R`` is the multimodal cosine of each retrieved behaviour with the target, divided by a
learnable temperature (initialised at 0.1, as in the release).
``alpha_Fusion = g1 * alpha_ID + g2 * R + g3 * alpha_ID * R`` with learnable scalars ``g1..g3``
(initialised at 1), and ``out = softmax(alpha_Fusion) (E_u W_v)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ranker.layers.attention import DotProductTargetAttention, masked_softmax


class SemanticAwareTargetAttention(nn.Module):
    """SA-TA over ``seq [B, K, E]`` with multimodal similarities ``sim [B, K]``.

    With ``g2 = g3 = 0`` and ``g1 = 1`` it is exactly :class:`DotProductTargetAttention` with the
    same projections (``self.attention``).
    """

    def __init__(self, in_dim: int, dim: int | None = None, temperature: float = 0.1) -> None:
        super().__init__()
        self.attention = DotProductTargetAttention(in_dim, dim)
        self.in_dim = in_dim
        self.out_dim = self.attention.out_dim
        self.gates = nn.Parameter(torch.ones(3))  # g1, g2, g3
        # log-parametrised so the temperature stays positive
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def fused_logits(self, target: torch.Tensor, seq: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """``alpha_Fusion [B, K]`` from the ID logits and the similarities ``sim [B, K]``."""
        alpha = self.attention.logits(target, seq)  # [B, K]
        r = sim / self.temperature  # [B, K]
        g1, g2, g3 = self.gates[0], self.gates[1], self.gates[2]
        return g1 * alpha + g2 * r + g3 * alpha * r

    def forward(
        self,
        target: torch.Tensor,
        seq: torch.Tensor,
        sim: torch.Tensor,
        mask: torch.Tensor,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weights = masked_softmax(self.fused_logits(target, seq, sim), mask)  # [B, K]
        out = self.attention.pool(weights, seq)  # [B, d]
        return (out, weights) if return_weights else out
