"""Frozen configs of the CTR models, one dataclass per model, and the feature spec they are built on.

Override order, lowest first: the dataclass defaults (the paper's settings, see docs/method.md) <
explicit keyword overrides given to :func:`ranker.models.registry.make_config`. Unknown keys are
rejected naming the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from muse.errors import ConfigurationError

#: ESU variants of MUSE for the ablation (TA, SimTier, both; SA-TA, SA-TA + SimTier).
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

    def __post_init__(self) -> None:
        for name in ("emb_dim", "recent_len", "k", "max_history", "sparse_min_rows"):
            if int(getattr(self, name)) <= 0:
                raise ConfigurationError(f"{name}={getattr(self, name)!r} must be a positive integer")
        object.__setattr__(self, "tower", tuple(int(h) for h in self.tower))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DINConfig(ModelConfig):
    """DIN: activation-unit attention over the recent behaviours only."""

    din_hidden: tuple[int, ...] = (80, 40)  # activation-unit MLP widths

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "din_hidden", tuple(int(h) for h in self.din_hidden))


@dataclass(frozen=True)
class SIMHardConfig(ModelConfig):
    """SIM-hard: the K most recent behaviours of the target's category, target attention."""


@dataclass(frozen=True)
class SIMSoftConfig(ModelConfig):
    """SIM-soft: top K by cosine of the model's own learned item embeddings, target attention."""


@dataclass(frozen=True)
class TWINConfig(ModelConfig):
    """TWIN: top K by the ESU's own scaled dot-product scores over the whole history."""


@dataclass(frozen=True)
class MUSEConfig(ModelConfig):
    """MUSE: multimodal GSU, then SA-TA and/or SimTier (``esu``) on the top K."""

    esu: str = "sa-ta+simtier"  # one of ESU_VARIANTS
    n_tiers: int = 22  # SimTier slots, tier = ceil(cos * 10) + 10
    temperature: float = 0.1  # initial SA-TA temperature on the multimodal cosine
    simtier_init: float | str = "uniform"  # per-tier SimTier weights: "uniform" = U(0, 1) as the release, or a constant

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.simtier_init != "uniform":
            try:
                object.__setattr__(self, "simtier_init", float(self.simtier_init))
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"simtier_init={self.simtier_init!r} must be 'uniform' or a number"
                ) from None
        if self.esu not in ESU_VARIANTS:
            raise ConfigurationError(f"esu={self.esu!r} is unknown; valid: {', '.join(ESU_VARIANTS)}")

    @property
    def uses_simtier(self) -> bool:
        return "simtier" in self.esu

    @property
    def attention(self) -> str | None:
        """'sa-ta', 'ta' or None (SimTier only)."""
        if self.esu.startswith("sa-ta"):
            return "sa-ta"
        return "ta" if self.esu.startswith("ta") else None


def build_config(cls: type[ModelConfig], overrides: dict[str, Any]) -> ModelConfig:
    """``cls(**overrides)`` with unknown keys rejected, naming the valid ones."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - valid
    if unknown:
        raise ConfigurationError(
            f"unknown {cls.__name__} keys {sorted(unknown)}; valid: {sorted(valid)}"
        )
    return cls(**field_defaults_filter(overrides))


def field_defaults_filter(overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values so a CLI option left unset keeps the dataclass default."""
    return {k: v for k, v in overrides.items() if v is not None}


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
