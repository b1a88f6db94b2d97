"""Configuration of the synthetic shopping world: one frozen dataclass and the named sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from muse.configs import config_from_dict
from muse.errors import ConfigurationError

DAY = 86_400  # seconds; world times are int64 seconds since the world's start


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes a generated world. Same config + same seed -> same bytes."""

    n_items: int  # catalogue size
    n_users: int
    max_history: int  # longest behaviour history (1,000 like Taobao-MM; 100,000 for `large`)
    min_history: int = 20  # shortest history
    impressions_per_user: float = 40.0  # mean number of labelled impressions per user
    search_sessions_per_user: float = 3.0  # mean number of search sessions per user
    n_top_categories: int = 10  # top level of the category tree (at most len(TOP_CATEGORIES))
    leaves_per_top: int = 5  # leaf categories under each top category (at most 5)
    n_colours: int = 12  # colours in use (at most len(COLOURS))
    horizon_days: int = 730  # length of the simulated time line
    zipf_alpha: float = 1.05  # item popularity ~ rank^-alpha (long tail)
    mean_lifetime_frac: float = 0.35  # mean item lifetime as a share of the horizon
    facets_per_user: float = 4.5  # mean number of lifelong interest facets
    facet_on_days: float = 50.0  # mean length of a facet's active stretch
    facet_off_days: float = 300.0  # mean length of a facet's dormant stretch
    impression_window_frac: float = 0.25  # impressions happen in the last quarter of the horizon
    test_frac: float = 0.08  # impressions in the last 8% of the horizon form the test split
    image_size: int = 64  # rendered images are image_size x image_size RGB PNGs
    image_batch: int = 512  # images rendered per vectorised batch
    user_batch_behaviours: int = 2_000_000  # flush histories/impressions after this many behaviours
    users_per_shard: int = 5_000  # history rows per parquet shard

    def __post_init__(self) -> None:
        from muse.data.simworld_vocab import COLOURS, TOP_CATEGORIES

        checks = {
            "n_items": self.n_items >= 10,
            "n_users": self.n_users >= 1,
            "max_history": self.max_history >= self.min_history >= 1,
            "n_top_categories": 1 <= self.n_top_categories <= len(TOP_CATEGORIES),
            "leaves_per_top": 1 <= self.leaves_per_top <= 5,
            "n_colours": 2 <= self.n_colours <= len(COLOURS),
            "horizon_days": self.horizon_days >= 10,
            "image_size": 16 <= self.image_size <= 256,
            "test_frac": 0 < self.test_frac < self.impression_window_frac < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigurationError(f"WorldConfig: invalid values for {bad}: {self}")

    @property
    def horizon(self) -> int:
        return self.horizon_days * DAY

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorldConfig:
        """Build from a dict, rejecting unknown keys (naming them and the valid ones)."""
        return config_from_dict(cls, values, "world config keys")


SIZES: dict[str, WorldConfig] = {
    # seconds: what tests use
    "tiny": WorldConfig(
        n_items=600,
        n_users=60,
        max_history=300,
        impressions_per_user=30,
        n_top_categories=4,
        leaves_per_top=3,
        n_colours=6,
        search_sessions_per_user=2,
    ),
    # about 20K items, 2K users, 1K histories: under 2 minutes on 2 CPUs
    "small": WorldConfig(n_items=20_000, n_users=2_000, max_history=1_000, impressions_per_user=40),
    "medium": WorldConfig(n_items=100_000, n_users=20_000, max_history=2_000, impressions_per_user=40),
    # 100K-behaviour histories for benchmarks, written in bounded batches
    "large": WorldConfig(
        n_items=200_000,
        n_users=1_000,
        max_history=100_000,
        min_history=1_000,
        impressions_per_user=100,
        users_per_shard=50,
        horizon_days=3_650,
        facet_on_days=150,
        facet_off_days=1200,
    ),
}


def world_config(size: str, **overrides: Any) -> WorldConfig:
    """The named size's config with ``overrides`` applied.

    Raises:
        ConfigurationError: unknown size (lists the valid ones) or unknown override keys.
    """
    if size not in SIZES:
        raise ConfigurationError(f"simworld size {size!r} is unknown; valid: {', '.join(SIZES)}")
    base = dataclasses.asdict(SIZES[size])
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigurationError(f"unknown world config keys {unknown}; valid: {sorted(base)}")
    base.update(overrides)
    return WorldConfig(**base)
