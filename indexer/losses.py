"""Contrastive losses of the three embedding sources.

- :class:`ClipLoss`: symmetric in-batch softmax over image <-> text (OpenCLIP).
- :class:`QueueInfoNCE`: InfoNCE whose negatives are the other keys of the batch plus a FIFO queue
  of keys from earlier batches (I2I, ID, SCL). The queue holds the detached keys it was given: from
  the online encoder (a memory bank), or for i2i with ``momentum`` from MoCo's momentum key encoder
  (``indexer.training.MomentumKeyEncoder``).
- :func:`hard_negative_triplet`: SCL's extra term for items clicked but not purchased in the session.

All inputs are L2-normalised ``[B, d]`` vectors, so dot products are cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse.errors import ConfigurationError


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigurationError(f"temperature={temperature} must be > 0")


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over the ``[B, B]`` similarity matrix: row i's positive is column i."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def get_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.T / self.temperature  # [B, B]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        logits = self.get_logits(a, b)  # [B, B]
        labels = torch.arange(len(a), device=a.device)  # [B]
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class QueueInfoNCE(nn.Module):
    """InfoNCE with in-batch negatives plus a queue of ``queue_size`` earlier keys.

    ``forward(q, k)`` scores each query against every key of the batch (its own key is the
    positive) and every queued key, then pushes the batch's keys into the queue.
    ``key_ids`` / ``query_ids`` (optional, int64 ``[B]``) name the items behind keys and queries: a
    negative that is the query's positive item or the query's own item is masked, so an item
    never serves as a negative of itself.

    Caution: without a momentum encoder the queued keys are stale. With lr 1e-3 even a queue of four
    batches (512 keys) lets the encoder lower the loss by moving *all* current vectors away from the
    queue, which collapses items onto one drifting point (measured on simworld ``small``: cosines
    between different items 0.97+ after 20 steps). Training therefore defaults to ``queue_size=0``;
    i2i can fill the queue from a momentum key encoder instead (``EmbedTrainConfig.momentum``).
    """

    def __init__(self, dim: int, queue_size: int = 4096, temperature: float = 0.07) -> None:
        super().__init__()
        _check_temperature(temperature)
        if queue_size < 0:
            raise ConfigurationError(f"queue_size={queue_size} must be >= 0")
        self.temperature = temperature
        self.queue_size = queue_size
        self.register_buffer("queue", torch.zeros(queue_size, dim))  # [Q, d]
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))  # [Q]
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # how many slots hold keys
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to overwrite

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        key_ids: torch.Tensor | None = None,
        query_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q, k ``[B, d]``: row i of k is the positive of row i of q. Returns the mean loss."""
        batch = len(q)
        in_batch = q @ k.T  # [B, B]; the diagonal holds the positives
        queued = q @ self.queue[: int(self.filled)].clone().T  # [B, n]; clone: _enqueue writes in place
        if key_ids is not None:
            pos_ids = key_ids.view(-1, 1)  # [B, 1]
            # Negatives that are the positive item itself (duplicates) or the query's own item.
            bad_batch = pos_ids == key_ids.view(1, -1)  # [B, B]
            bad_queue = pos_ids == self.queue_ids[: queued.shape[1]].view(1, -1)  # [B, n]
            if query_ids is not None:
                bad_batch |= query_ids.view(-1, 1) == key_ids.view(1, -1)
                bad_queue |= query_ids.view(-1, 1) == self.queue_ids[: queued.shape[1]].view(1, -1)
            bad_batch.fill_diagonal_(False)
            in_batch = in_batch.masked_fill(bad_batch, float("-inf"))
            queued = queued.masked_fill(bad_queue, float("-inf"))
        logits = torch.cat([in_batch, queued], dim=1) / self.temperature  # [B, B + n]
        loss = F.cross_entropy(logits, torch.arange(batch, device=q.device))
        self._enqueue(k.detach(), key_ids)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor, key_ids: torch.Tensor | None) -> None:
        if self.queue_size == 0:
            return
        k = k[-self.queue_size :]  # a batch larger than the queue keeps its last keys
        ids = key_ids[-self.queue_size :] if key_ids is not None else torch.full((len(k),), -1, device=k.device)
        slots = (int(self.ptr) + torch.arange(len(k), device=k.device)) % self.queue_size  # [b]
        self.queue[slots] = k
        self.queue_ids[slots] = ids.to(self.queue_ids.dtype)
        self.ptr.fill_((int(self.ptr) + len(k)) % self.queue_size)
        self.filled.fill_(min(self.queue_size, int(self.filled) + len(k)))


def hard_negative_triplet(
    q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, neg_mask: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """Triplet hinge ``max(0, margin - cos(q, pos) + cos(q, neg))`` averaged over valid hard negatives.

    Args:
        q: queries ``[B, d]``; pos: their positives ``[B, d]``.
        neg: hard negatives ``[B, H, d]``; neg_mask: ``[B, H]`` bool, False for padding.
    Returns:
        A scalar (0 when the batch has no hard negative).
    """
    pos_sim = (q * pos).sum(-1, keepdim=True)  # [B, 1]
    neg_sim = torch.einsum("bd,bhd->bh", q, neg)  # [B, H]
    hinge = F.relu(margin - pos_sim + neg_sim) * neg_mask  # [B, H]
    n_valid = neg_mask.sum()
    return hinge.sum() / n_valid.clamp(min=1)
