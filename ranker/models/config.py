"""Frozen configs of the CTR models, one dataclass per model, and the feature spec they are built on.

Override order, lowest first: the dataclass defaults (the paper's settings, see docs/method.md) <
explicit keyword overrides given to :func:`ranker.models.registry.make_config`. Unknown keys are
rejected naming the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from muse.configs import config_from_dict
from muse.errors import ConfigurationError
from muse.simtier import N_TIERS

#: ESU variants (TA, SimTier, both; SA-TA, SA-TA + SimTier). "ta" alone is the classic ID-only ESU.
ESU_VARIANTS = ("ta", "simtier", "ta+simtier", "sa-ta", "sa-ta+simtier")


@dataclass(frozen=True)
class FeatureSpec:
    """The data-dependent part of a model: table sizes per field (0 = padding) and user fields."""

    vocab_sizes: dict[str, int]  # field -> rows (item, category, feat_a, feat_b, user fields)
    user_fields: tuple[str, ...]  # user feature names in the order of batch["user"]'s last axis

    def to_dict(self) -> dict[str, Any]:
        return {"vocab_sizes": dict(self.vocab_sizes), "user_fields": list(self.user_fields)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(vocab_sizes={k: int(v) for k, v in d["vocab_sizes"].items()},
                   user_fields=tuple(d["user_fields"]))


@dataclass(frozen=True)
class ModelConfig:
    """Settings shared by every model."""

    emb_dim: int = 16  # D per feature; items are item + category = 2D in attention
    recent_len: int = 50  # short sequence: the most recent behaviours
    k: int = 50  # behaviours kept by the GSU (long-sequence search)
    max_history: int = 1000  # longest history the pipeline keeps (newest entries)
    tower: tuple[int, ...] = (256, 128, 64)  # hidden widths of the MLP tower
    activation: str = "dice"  # tower activation: dice | relu | prelu
    sparse_min_rows: int = 1_000_000  # tables with at least this many rows get sparse gradients (SparseAdam)
    # the ESU (see docs/ranker.md, "What each model sees"); each model's default is the paper's set-up
    esu: str = "sa-ta+simtier"  # one of the model's esu_choices
    n_tiers: int = N_TIERS  # SimTier slots, tier = ceil(cos * 10) + 10
    temperature: float = 0.1  # initial SA-TA temperature on the multimodal cosine
    simtier_init: float | str = "uniform"  # per-tier SimTier weights: "uniform" = U(0, 1) as the release, or a constant

    #: ESU variants this model accepts
    esu_choices: ClassVar[tuple[str, ...]] = ESU_VARIANTS
    #: True: the model's GSU itself needs item vectors (MUSE)
    gsu_needs_vectors: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for name in ("emb_dim", "recent_len", "k", "max_history", "sparse_min_rows", "n_tiers"):
            if int(getattr(self, name)) <= 0:
                raise ConfigurationError(f"{name}={getattr(self, name)!r} must be a positive integer")
        object.__setattr__(self, "tower", tuple(int(h) for h in self.tower))
        if self.esu not in self.esu_choices:
            raise ConfigurationError(
                f"esu={self.esu!r} is not an ESU of {type(self).__name__}; valid: {', '.join(self.esu_choices)}"
            )
        if self.simtier_init != "uniform":
            try:
                object.__setattr__(self, "simtier_init", float(self.simtier_init))
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"simtier_init={self.simtier_init!r} must be 'uniform' or a number"
                ) from None

    @property
    def uses_simtier(self) -> bool:
        return "simtier" in self.esu

    @property
    def attention(self) -> str | None:
        """'sa-ta', 'ta' or None (SimTier only)."""
        if self.esu.startswith("sa-ta"):
            return "sa-ta"
        return "ta" if self.esu.startswith("ta") else None

    @property
    def needs_vectors(self) -> bool:
        """Whether the model needs an embedding source: its GSU uses it, or its ESU uses multimodal
        similarities (SimTier, SA-TA)."""
        return self.gsu_needs_vectors or self.uses_simtier or self.attention == "sa-ta"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DINConfig(ModelConfig):
    """DIN: activation-unit attention over the recent behaviours, plus SimTier over the recent
    behaviours' multimodal similarities (the release's DIN); ``esu="ta"``: the classic DIN."""

    esu: str = "ta+simtier"
    esu_choices: ClassVar[tuple[str, ...]] = ("ta", "ta+simtier")
    din_hidden: tuple[int, ...] = (80, 40)  # activation-unit MLP widths

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "din_hidden", tuple(int(h) for h in self.din_hidden))


@dataclass(frozen=True)
class SIMHardConfig(ModelConfig):
    """SIM-hard: the K most recent behaviours of the target's category, then MUSE's ESU over their
    multimodal similarities (the paper's set-up); ``esu="ta"``: ID-only target attention."""


@dataclass(frozen=True)
class SIMSoftConfig(ModelConfig):
    """SIM-soft: top K by cosine of the model's own learned item embeddings, then MUSE's ESU over
    their multimodal similarities (the paper's set-up); ``esu="ta"``: ID-only target attention."""


@dataclass(frozen=True)
class TWINConfig(ModelConfig):
    """TWIN: top K by the ESU's own scaled dot-product scores over the whole history, its target
    attention, plus SimTier (the paper's set-up); ``esu="ta"``: without SimTier."""

    esu: str = "ta+simtier"
    esu_choices: ClassVar[tuple[str, ...]] = ("ta", "ta+simtier")


@dataclass(frozen=True)
class MUSEConfig(ModelConfig):
    """MUSE: multimodal GSU, then SA-TA and/or SimTier (``esu``) on the top K."""

    gsu_needs_vectors: ClassVar[bool] = True


def build_config(cls: type[ModelConfig], overrides: dict[str, Any]) -> ModelConfig:
    """``cls(**overrides)`` with unknown keys rejected, naming the valid ones; ``None`` values keep
    the dataclass default (a CLI option left unset). One builder: :func:`muse.configs.config_from_dict`."""
    return config_from_dict(cls, overrides, drop_none=True)


__all__ = [
    "DINConfig",
    "ESU_VARIANTS",
    "FeatureSpec",
    "MUSEConfig",
    "ModelConfig",
    "SIMHardConfig",
    "SIMSoftConfig",
    "TWINConfig",
    "build_config",
]
