"""Users of the synthetic world: lifelong interest facets that go dormant and return, short-term
intents, behaviour histories with repeats, search sessions, and impressions labelled by a
ground-truth click model.

Each user is simulated from its own random stream (``seed``, user id), so the result does not
depend on batching. Item references inside this module are catalogue row indexes (id - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from muse.data.simworld_config import DAY, WorldConfig
from muse.data.simworld_items import Catalogue, Pools, sample_alive
from muse.data.simworld_vocab import COLOURS, PATTERNS, STYLES

MAX_FACETS = 8
P_REPEAT = 0.12  # a behaviour re-visits one of the last few items
P_INTENT = 0.55  # during a short-term intent, share of behaviours that follow it
P_EXPLORE = 0.08  # behaviours on globally popular items
INTENT_GAP_DAYS, INTENT_DAYS = 25.0, 3.0
P_FULL_HISTORY = 0.35  # share of users whose history reaches max_history
RECENT = 50  # the short sequence a DIN-style model sees
# impression candidates: from a lifelong facet (dormant ones included), from recent intent, else popular
P_CAND_FACET, P_CAND_RECENT = 0.50, 0.15
# ground-truth click model: logit = BIAS + W_LIFELONG*lifelong + W_RECENT*recent + W_POP*pop_z + noise
BIAS, W_LIFELONG, W_ACTIVE, W_RECENT, W_POP, NOISE = -3.0, 2.8, 0.2, 1.6, 0.25, 0.5
EXPLAINED = ("lifelong", "recent", "other")


@dataclass
class UserSim:
    """One simulated user (item references are catalogue indexes)."""

    user_id: int
    features: tuple[int, int, int, int, int]
    hist_items: np.ndarray  # int64 [L]
    hist_times: np.ndarray  # int64 [L], non-decreasing
    imp_items: np.ndarray  # int64 [M]
    imp_times: np.ndarray  # int64 [M]
    imp_hist_len: np.ndarray  # int32 [M]
    imp_labels: np.ndarray  # int8 [M]
    imp_p_click: np.ndarray  # float32 [M]
    imp_explained: np.ndarray  # int8 [M], index into EXPLAINED (labels 0 included)
    imp_match_key: np.ndarray  # int64 [M], interest key of the best lifelong facet (-1 none)
    imp_key_in_recent: np.ndarray  # bool [M], that key appears in the last RECENT visible behaviours
    imp_key_in_history: np.ndarray  # bool [M], that key appears anywhere in the visible history
    facet_keys: np.ndarray  # int64 [F]
    facet_patterns: np.ndarray  # int64 [F]
    facet_strength: np.ndarray  # float64 [F], max 1
    facet_active_share: np.ndarray  # float64 [F], share of the horizon the facet is active
    sessions: list[tuple[int, str, list[int], int]]  # (time, query, clicked indexes, purchased index or -1)


def _episodes(
    rng: np.random.Generator, start: float, horizon: int, on_mean: float, off_mean: float
) -> tuple[bool, np.ndarray]:
    """Activity of one facet: off until it is acquired at ``start``, then alternating on/off stretches.
    Returns (initially on?, change times).
    """
    state, t, changes = True, start, [start]
    while t < horizon:
        t += rng.exponential(on_mean if state else off_mean)
        changes.append(t)
        state = not state
    return False, np.asarray(changes, dtype=np.float64)


def _active(init: bool, changes: np.ndarray, times: np.ndarray) -> np.ndarray:
    flips = np.searchsorted(changes, times, side="right")
    return (flips % 2 == 0) if init else (flips % 2 == 1)


class _UserModel:
    """The latent state of one user: facets with activity stretches, and intent episodes."""

    def __init__(self, rng: np.random.Generator, config: WorldConfig, cat: Catalogue, pools: Pools) -> None:
        h = config.horizon
        self.t0 = float(rng.uniform(0.0, 0.4) * h)  # the user's first behaviour
        n_f = int(min(MAX_FACETS, 2 + rng.poisson(max(config.facets_per_user - 2, 0.0))))
        keys: list[int] = []
        patterns: list[int] = []
        for _ in range(n_f * 4):  # distinct keys, picked via items with flattened popularity
            i = int(np.searchsorted(pools.facet_cum, rng.random(), side="right"))
            i = min(i, cat.n - 1)
            if int(cat.key[i]) not in keys:
                keys.append(int(cat.key[i]))
                patterns.append(
                    int(cat.pattern[i]) if rng.random() < 0.6 else int(rng.integers(0, len(PATTERNS)))
                )
            if len(keys) == n_f:
                break
        self.keys = np.asarray(keys, dtype=np.int64)
        self.patterns = np.asarray(patterns, dtype=np.int64)
        w = rng.dirichlet(np.full(len(keys), 1.0))
        self.strength = w / w.max()
        # each facet is acquired during the first 60% of the user's life, then sleeps and returns
        self.schedules = [
            _episodes(
                rng,
                rng.uniform(self.t0, self.t0 + 0.6 * (h - self.t0)),
                h,
                config.facet_on_days * DAY * rng.uniform(0.5, 1.5),
                config.facet_off_days * DAY * rng.uniform(0.5, 1.5),
            )
            for _ in keys
        ]
        starts, ends, ikeys, t = [], [], [], 0.0
        while True:
            t += rng.exponential(INTENT_GAP_DAYS * DAY)
            if t >= h:
                break
            i = min(int(np.searchsorted(pools.facet_cum, rng.random(), side="right")), cat.n - 1)
            starts.append(t)
            ends.append(t + rng.exponential(INTENT_DAYS * DAY))
            ikeys.append(int(cat.key[i]))
        self.intent_start = np.asarray(starts, dtype=np.float64)
        self.intent_end = np.asarray(ends, dtype=np.float64)
        self.intent_key = np.asarray(ikeys, dtype=np.int64)

    def active(self, times: np.ndarray) -> np.ndarray:
        """[F, n] bool: which facets are active at each time."""
        if len(self.keys) == 0:
            return np.zeros((0, len(times)), dtype=bool)
        return np.stack([_active(init, ch, times) for init, ch in self.schedules])

    def intent(self, times: np.ndarray) -> np.ndarray:
        """[n] int64: the intent key at each time, -1 when none."""
        if len(self.intent_start) == 0:
            return np.full(len(times), -1, dtype=np.int64)
        j = np.searchsorted(self.intent_start, times, side="right") - 1
        inside = (j >= 0) & (times < self.intent_end[np.maximum(j, 0)])
        return np.where(inside, self.intent_key[np.maximum(j, 0)], -1)

    def choose_facet(self, rng: np.random.Generator, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per column of ``act`` [F, n]: a facet drawn by strength among the active ones.

        Returns (facet index [n], whether any facet is active [n]).
        """
        w = self.strength[:, None] * act  # [F, n]
        total = w.sum(axis=0)
        r = rng.random(act.shape[1]) * total
        f = (np.cumsum(w, axis=0) > r[None, :]).argmax(axis=0)
        return f, total > 0


def _items_for_keys(
    rng: np.random.Generator, cat: Catalogue, pools: Pools, keys: np.ndarray, times: np.ndarray
) -> np.ndarray:
    """An item per (key, time); key -1 means any item by global popularity."""
    out = np.zeros(len(keys), dtype=np.int64)
    for k in np.unique(keys).tolist():
        sel = np.flatnonzero(keys == k)
        if k < 0 or k not in pools.key_items:
            out[sel] = sample_alive(rng, cat, None, pools.global_cum, times[sel])
        else:
            out[sel] = sample_alive(rng, cat, pools.key_items[k], pools.key_cum[k], times[sel])
    return out


def _history_length(rng: np.random.Generator, config: WorldConfig) -> int:
    """A share of users reach the cap (as on Taobao-MM); the others are log-uniform below it."""
    if rng.random() < P_FULL_HISTORY:
        return config.max_history
    lo, hi = np.log(config.min_history), np.log(config.max_history)
    return int(min(config.max_history, max(config.min_history, round(float(np.exp(rng.uniform(lo, hi)))))))


def _behaviours(
    rng: np.random.Generator, config: WorldConfig, cat: Catalogue, pools: Pools, user: _UserModel, n: int
) -> tuple[np.ndarray, np.ndarray]:
    times = np.sort(rng.uniform(user.t0, config.horizon, n)).astype(np.int64)
    intent = user.intent(times)
    facet, any_active = user.choose_facet(rng, user.active(times))
    u = rng.random(n)
    idx = np.arange(n)
    repeat = (u < P_REPEAT) & (idx > 0)
    follow_intent = ~repeat & (intent >= 0) & (u < P_REPEAT + P_INTENT)
    follow_facet = ~repeat & ~follow_intent & any_active & (u < 1.0 - P_EXPLORE)
    keys = np.full(n, -1, dtype=np.int64)
    keys[follow_intent] = intent[follow_intent]
    if len(user.keys):
        keys[follow_facet] = user.keys[facet[follow_facet]]
    items = np.zeros(n, dtype=np.int64)
    fresh = ~repeat
    items[fresh] = _items_for_keys(rng, cat, pools, keys[fresh], times[fresh])
    # repeats point back 1..10 steps; follow pointers until they land on a fresh behaviour
    back = rng.integers(1, 11, n)
    src = np.where(repeat, np.maximum(idx - back, 0), idx)
    for _ in range(64):
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    return items[src], times


def _match(cat: Catalogue, items: np.ndarray, keys: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """[F, n] how well each item matches each facet: 1 on the key (+0.3 on the preferred pattern),
    0.3 on the leaf only, 0.1 on the colour within the same top category.
    """
    n_col = cat.n_colours
    k_leaf, k_col = keys[:, None] // n_col, keys[:, None] % n_col
    i_leaf, i_col = cat.leaf[items][None, :], cat.colour[items][None, :]
    same_leaf, same_col = k_leaf == i_leaf, k_col == i_col
    same_top = (k_leaf // cat.leaves_per_top) == (i_leaf // cat.leaves_per_top)
    full = same_leaf & same_col
    return (
        full * (1.0 + 0.3 * (patterns[:, None] == cat.pattern[items][None, :]))
        + (same_leaf & ~same_col) * 0.3
        + (same_top & ~same_leaf & same_col) * 0.1
    )


def _impressions(
    rng: np.random.Generator,
    config: WorldConfig,
    cat: Catalogue,
    pools: Pools,
    user: _UserModel,
    hist_items: np.ndarray,
    hist_times: np.ndarray,
    log_pop_mean: float,
    log_pop_std: float,
) -> dict[str, np.ndarray]:
    h = config.horizon
    m = max(2, int(rng.poisson(config.impressions_per_user)))
    times = np.sort(rng.uniform((1.0 - config.impression_window_frac) * h, h, m)).astype(np.int64)
    hist_len = np.searchsorted(hist_times, times, side="left").astype(np.int32)
    hist_keys = cat.key[hist_items]
    intent = user.intent(times)
    r = rng.random(m)
    keys = np.full(m, -1, dtype=np.int64)
    from_facet = (r < P_CAND_FACET) & (len(user.keys) > 0)
    if len(user.keys):
        keys[from_facet] = user.keys[rng.integers(0, len(user.keys), m)][from_facet]
    from_recent = ~from_facet & (r < P_CAND_FACET + P_CAND_RECENT)
    for j in np.flatnonzero(from_recent):
        if intent[j] >= 0:
            keys[j] = intent[j]
        elif hist_len[j] > 0:
            keys[j] = hist_keys[max(0, hist_len[j] - 20) + rng.integers(0, min(20, hist_len[j]))]
    items = _items_for_keys(rng, cat, pools, keys, times)

    n_f = len(user.keys)
    item_keys = cat.key[items]
    recent_sets = [hist_keys[max(0, hl - RECENT) : hl] for hl in hist_len.tolist()]
    # lifelong interest: every facet counts, dormant or not; active ones a little more
    if n_f:
        match = _match(cat, items, user.keys, user.patterns)  # [F, m]
        score = user.strength[:, None] * match * (1.0 + W_ACTIVE * user.active(times))  # [F, m]
        best = score.argmax(axis=0)
        lifelong = score.max(axis=0)
        best_full = match[best, np.arange(m)] >= 1.0
    else:
        best, lifelong, best_full = np.zeros(m, dtype=np.int64), np.zeros(m), np.zeros(m, dtype=bool)
    intent_match = np.where(item_keys == intent, 1.0, 0.0)
    recent_count = np.array(
        [np.count_nonzero(rs[-20:] == k) for rs, k in zip(recent_sets, item_keys.tolist())]
    )
    recent = np.maximum(intent_match, 0.8 * np.minimum(1.0, recent_count / 4.0))
    pop_z = (np.log(cat.popularity[items]) - log_pop_mean) / log_pop_std
    logit = BIAS + W_LIFELONG * lifelong + W_RECENT * recent + W_POP * pop_z + rng.normal(0, NOISE, m)
    p_click = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random(m) < p_click).astype(np.int8)

    explained = np.full(m, EXPLAINED.index("other"), dtype=np.int8)
    by_lifelong = best_full & (W_LIFELONG * lifelong >= W_RECENT * recent)
    explained[by_lifelong] = EXPLAINED.index("lifelong")
    explained[~by_lifelong & (recent >= 0.3)] = EXPLAINED.index("recent")
    match_key = np.where(best_full, user.keys[best] if n_f else -1, -1).astype(np.int64)
    in_recent = np.array([k >= 0 and bool(np.any(rs == k)) for rs, k in zip(recent_sets, match_key.tolist())])
    in_hist = np.array(
        [k >= 0 and bool(np.any(hist_keys[:hl] == k)) for hl, k in zip(hist_len.tolist(), match_key.tolist())]
    )
    return {
        "items": items,
        "times": times,
        "hist_len": hist_len,
        "labels": labels,
        "p_click": p_click.astype(np.float32),
        "explained": explained,
        "match_key": match_key,
        "in_recent": in_recent.astype(bool),
        "in_hist": in_hist.astype(bool),
    }


def _sessions(
    rng: np.random.Generator, config: WorldConfig, cat: Catalogue, pools: Pools, user: _UserModel, t0: int
) -> list[tuple[int, str, list[int], int]]:
    n_s = min(999, int(rng.poisson(config.search_sessions_per_user)))
    if n_s == 0 or len(user.keys) == 0:
        return []
    times = np.sort(rng.uniform(t0, config.horizon, n_s)).astype(np.int64)
    act = user.active(times)
    facet, any_active = user.choose_facet(rng, act)
    fallback = rng.choice(len(user.keys), size=n_s, p=user.strength / user.strength.sum())
    facet = np.where(any_active, facet, fallback)
    out = []
    for t, f in zip(times.tolist(), facet.tolist()):
        key, pat = int(user.keys[f]), int(user.patterns[f])
        leaf, col = divmod(key, cat.n_colours)
        words = [str(rng.choice(cat.leaf_words(leaf)))]
        if rng.random() < 0.8:
            words.insert(0, str(rng.choice(COLOURS[col][0])))
        if pat != 0 and rng.random() < 0.35:
            words.insert(0, str(rng.choice(PATTERNS[pat])))
        if rng.random() < 0.2:
            words.insert(0, str(rng.choice(STYLES[int(rng.integers(0, len(STYLES)))])))
        tt = np.full(6, t, dtype=np.int64)
        results = np.concatenate(
            [
                sample_alive(rng, cat, pools.key_items[key], pools.key_cum[key], tt),
                sample_alive(rng, cat, pools.leaf_items[leaf], pools.leaf_cum[leaf], tt[:4]),
            ]
        )
        results = np.unique(results)[rng.permutation(len(np.unique(results)))]
        on_key = cat.key[results] == key
        on_pat = cat.pattern[results] == pat
        p = np.where(on_key, 0.55 + 0.25 * on_pat, 0.12)
        clicked = results[rng.random(len(results)) < p]
        if len(clicked) == 0:
            clicked = results[on_key][:1] if on_key.any() else results[:1]
        purchased = -1
        c_key = cat.key[clicked] == key
        if c_key.any() and rng.random() < 0.65:
            score = c_key * 2.0 + (cat.pattern[clicked] == pat) + rng.random(len(clicked))
            purchased = int(clicked[score.argmax()])
        out.append((t, " ".join(words), [int(c) for c in clicked], purchased))
    return out


def simulate_user(
    config: WorldConfig, cat: Catalogue, pools: Pools, seed: int, user_id: int, log_pop: tuple[float, float]
) -> UserSim:
    """Simulate one user from its own random stream ``(seed, 3, user_id)``."""
    rng = np.random.default_rng([seed, 3, user_id])
    user = _UserModel(rng, config, cat, pools)
    n = _history_length(rng, config)
    hist_items, hist_times = _behaviours(rng, config, cat, pools, user, n)
    imp = _impressions(rng, config, cat, pools, user, hist_items, hist_times, *log_pop)
    sessions = _sessions(rng, config, cat, pools, user, int(hist_times[0]))
    grid = np.linspace(0, config.horizon, 200)
    strongest_top = (
        int(user.keys[user.strength.argmax()] // cat.n_colours // cat.leaves_per_top)
        if len(user.keys)
        else -1
    )
    features = (
        int(rng.integers(0, 7)),
        int(rng.integers(0, 2)),
        int(rng.integers(0, 5)),
        int(np.log2(max(1, n))),
        strongest_top + 1,
    )
    return UserSim(
        user_id=user_id,
        features=features,
        hist_items=hist_items,
        hist_times=hist_times,
        imp_items=imp["items"],
        imp_times=imp["times"],
        imp_hist_len=imp["hist_len"],
        imp_labels=imp["labels"],
        imp_p_click=imp["p_click"],
        imp_explained=imp["explained"],
        imp_match_key=imp["match_key"],
        imp_key_in_recent=imp["in_recent"],
        imp_key_in_history=imp["in_hist"],
        facet_keys=user.keys,
        facet_patterns=user.patterns,
        facet_strength=user.strength,
        facet_active_share=user.active(grid).mean(axis=1) if len(user.keys) else np.zeros(0),
        sessions=sessions,
    )
