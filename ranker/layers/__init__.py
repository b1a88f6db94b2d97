"""Torch building blocks of the CTR models: one concept per module.

- :mod:`ranker.layers.attention`: dot-product target attention and the DIN activation unit.
- :mod:`ranker.layers.sata`: semantic-aware target attention (SA-TA).
- :mod:`ranker.layers.simtier`: SimTier histogram features of GSU similarities.
- :mod:`ranker.layers.dice`: the Dice activation.
- :mod:`ranker.layers.mlp`: the MLP tower that turns features into a click logit.
- :mod:`ranker.layers.embeddings`: the ID/feature embedding tables.
- :mod:`ranker.layers.rows`: row chunks that keep the whole-history searches in cache.
"""

from ranker.layers.attention import DinAttention, DotProductTargetAttention, masked_mean, masked_softmax
from ranker.layers.dice import Dice
from ranker.layers.embeddings import FeatureEmbeddings
from ranker.layers.mlp import MLPTower
from ranker.layers.rows import chunked, row_chunks
from ranker.layers.sata import SemanticAwareTargetAttention
from ranker.layers.simtier import SimTier

__all__ = [
    "Dice",
    "DinAttention",
    "DotProductTargetAttention",
    "FeatureEmbeddings",
    "MLPTower",
    "SemanticAwareTargetAttention",
    "SimTier",
    "chunked",
    "masked_mean",
    "masked_softmax",
    "row_chunks",
]
