"""The item catalogue of the synthetic world: latent attributes, Zipf popularity, lifetimes, titles,
and the pools (items per interest key) that users draw from.

An *interest key* is (leaf category, colour): the unit of a user's interest facet. Both halves are
visible in the content (the leaf through the label band of the image and the title's words, the colour
in the pixels and often in the title), so content embeddings can group an item with the user's old
behaviours on the same key. (The shape alone does not show the leaf: 50 leaves share 6 shapes.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from muse.data.simworld_config import WorldConfig
from muse.data.simworld_vocab import (
    COLOURS,
    FILLERS,
    P_TITLE_COLOUR,
    P_TITLE_PATTERN,
    P_TITLE_SHAPE,
    P_TITLE_STYLE,
    PATTERNS,
    SHAPES,
    STYLES,
    TOP_CATEGORIES,
)

N_BRANDS = 300
P_TYPICAL_SHAPE = 0.75  # an item takes its leaf category's typical shape this often


@dataclass(frozen=True)
class Catalogue:
    """Column arrays over items (index i is item id i + 1)."""

    item_id: np.ndarray  # int64 [n]
    leaf: np.ndarray  # int64 [n], 0-based leaf category index (category id = leaf + 1)
    top: np.ndarray  # int64 [n], 0-based top category index
    colour: np.ndarray  # int64 [n]
    shape: np.ndarray  # int64 [n]
    pattern: np.ndarray  # int64 [n]
    style: np.ndarray  # int64 [n]
    brand: np.ndarray  # int64 [n]
    popularity: np.ndarray  # float64 [n], sums to 1
    birth: np.ndarray  # int64 [n], seconds (may be < 0: on sale before the world starts)
    death: np.ndarray  # int64 [n], seconds
    titles: list[str]
    n_colours: int
    leaves_per_top: int

    @property
    def n(self) -> int:
        return len(self.item_id)

    @functools.cached_property
    def key(self) -> np.ndarray:
        """Interest key per item: leaf * n_colours + colour."""
        return self.leaf * self.n_colours + self.colour

    def leaf_words(self, leaf: int) -> tuple[str, ...]:
        top, sub = divmod(int(leaf), self.leaves_per_top)
        return TOP_CATEGORIES[top][1][sub]


@dataclass(frozen=True)
class Pools:
    """Items grouped by interest key and by leaf, each with cumulative popularity for sampling."""

    key_items: dict[int, np.ndarray]  # key -> item indexes
    key_cum: dict[int, np.ndarray]  # key -> cumulative normalised popularity
    leaf_items: dict[int, np.ndarray]
    leaf_cum: dict[int, np.ndarray]
    global_cum: np.ndarray  # cumulative popularity over all items
    facet_cum: np.ndarray  # cumulative flattened popularity (pop^0.4): how interest keys are picked


def _title(rng: np.random.Generator, cat: Catalogue, i: int) -> str:
    words: list[str] = []
    if rng.random() < P_TITLE_STYLE:
        words.append(str(rng.choice(STYLES[cat.style[i]])))
    if rng.random() < P_TITLE_COLOUR:
        words.append(str(rng.choice(COLOURS[cat.colour[i]][0])))
    if rng.random() < P_TITLE_PATTERN and cat.pattern[i] != 0:
        words.append(str(rng.choice(PATTERNS[cat.pattern[i]])))
    if rng.random() < P_TITLE_SHAPE:
        words.append(str(rng.choice(SHAPES[cat.shape[i]])))
    words.append(str(rng.choice(cat.leaf_words(cat.leaf[i]))))
    if rng.random() < 0.3:
        words.insert(0, f"brand{int(cat.brand[i]):03d}")
    for _ in range(rng.poisson(1.2)):
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(FILLERS)))
    if rng.random() < 0.15:  # light word-order noise
        j = int(rng.integers(0, len(words)))
        words.append(words.pop(j))
    return " ".join(words)


def make_catalogue(config: WorldConfig, seed: int) -> Catalogue:
    """Draw the catalogue (deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, 0])
    n = config.n_items
    n_leaves = config.n_top_categories * config.leaves_per_top
    # leaves and colours have mildly uneven shares, as real catalogues do
    leaf_w = rng.dirichlet(np.full(n_leaves, 3.0))
    colour_w = rng.dirichlet(np.full(config.n_colours, 4.0))
    leaf = rng.choice(n_leaves, size=n, p=leaf_w).astype(np.int64)
    colour = rng.choice(config.n_colours, size=n, p=colour_w).astype(np.int64)
    typical_shape = rng.integers(0, len(SHAPES), size=n_leaves)
    shape = np.where(rng.random(n) < P_TYPICAL_SHAPE, typical_shape[leaf], rng.integers(0, len(SHAPES), n))
    pattern = rng.choice(len(PATTERNS), size=n, p=[0.4, 0.18, 0.14, 0.14, 0.14]).astype(np.int64)
    style = rng.integers(0, len(STYLES), size=n).astype(np.int64)
    brand = np.minimum(rng.zipf(1.6, size=n), N_BRANDS) - 1
    rank = rng.permutation(n)  # popularity rank of each item: Zipf weights, a long tail
    popularity = 1.0 / np.power(rank + 1.0, config.zipf_alpha)
    popularity /= popularity.sum()
    horizon = config.horizon
    birth = rng.uniform(-0.5 * horizon, horizon, size=n).astype(np.int64)
    life = rng.exponential(config.mean_lifetime_frac * horizon, size=n) + 7 * 86_400
    death = birth + life.astype(np.int64)
    cat = Catalogue(
        item_id=np.arange(1, n + 1, dtype=np.int64),
        leaf=leaf,
        top=leaf // config.leaves_per_top,
        colour=colour,
        shape=shape.astype(np.int64),
        pattern=pattern,
        style=style,
        brand=brand.astype(np.int64),
        popularity=popularity,
        birth=birth,
        death=death,
        titles=[],
        n_colours=config.n_colours,
        leaves_per_top=config.leaves_per_top,
    )
    cat.titles.extend(_title(rng, cat, i) for i in range(n))
    return cat


def make_pools(cat: Catalogue) -> Pools:
    """Group items by interest key and by leaf (sorted, deterministic)."""

    def group(keys: np.ndarray) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        order = np.argsort(keys, kind="stable")
        uniq, starts = np.unique(keys[order], return_index=True)
        items, cums = {}, {}
        for k, members in zip(uniq.tolist(), np.split(order, starts[1:])):
            items[k] = members
            c = np.cumsum(cat.popularity[members])
            cums[k] = c / c[-1]
        return items, cums

    key_items, key_cum = group(cat.key)
    leaf_items, leaf_cum = group(cat.leaf)
    g = np.cumsum(cat.popularity)
    f = np.cumsum(np.power(cat.popularity, 0.4))
    return Pools(key_items, key_cum, leaf_items, leaf_cum, g / g[-1], f / f[-1])


def sample_alive(
    rng: np.random.Generator,
    cat: Catalogue,
    members: np.ndarray | None,
    cum: np.ndarray,
    times: np.ndarray,
    tries: int = 8,
) -> np.ndarray:
    """For each time, an item index drawn by popularity from ``members`` (all items when None),
    preferring items on sale at that time (``tries`` draws; else the first draw, an expired item).
    """
    n = len(times)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    draws = np.searchsorted(cum, rng.random((n, tries)), side="right")  # [n, tries]
    draws = np.minimum(draws, len(cum) - 1)
    idx = draws if members is None else members[draws]
    alive = (cat.birth[idx] <= times[:, None]) & (times[:, None] < cat.death[idx])  # [n, tries]
    first = np.where(alive.any(axis=1), alive.argmax(axis=1), 0)
    return idx[np.arange(n), first]
