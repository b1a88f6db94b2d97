"""The SimTier binning both the retriever (which counts) and the ranker (which learns a weight per
tier) use, defined once so that serving and training bin identically.

A cosine ``cos`` in [-1, 1] falls in tier ``ceil(cos * 10) + 10``: tiers 0..20 are reachable, slot
21 is spare (as in the release).
"""

from __future__ import annotations

#: SimTier slots: tier id = ceil(cos * 10) + 10 lies in 0..20 for cos in [-1, 1]; slot 21 is spare.
N_TIERS = 22

__all__ = ["N_TIERS"]
