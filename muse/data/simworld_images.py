"""Rendering of item images: a shape in the item's colour, filled with its pattern, on a background
that shows its style, with random placement, size, rotation, lighting and pixel noise, and a label
band along the top that shows the item's leaf category (what kind of product it is).

The leaf label exists because 50 leaf categories share only 6 shapes: without it an image shows
the colour half of an interest key (leaf x colour) but not the leaf half, so no image encoder can
find the old behaviours on a user's key (measured with ``python -m bench.neighbours``; see
docs/ranker.md, "The paper's Table 1 at the ranker level").

Rendering is vectorised over a batch of items; each image is then PNG-encoded with Pillow.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from muse.data.simworld_items import Catalogue
from muse.data.simworld_vocab import COLOURS

#: Version of the rendering, recorded in a simworld's ``meta.json`` as ``image_version``: 2 = with the
#: leaf label (a dataset without the key was rendered without it).
IMAGE_VERSION = 2
#: The leaf label: a band of ``LABEL_ROWS`` share of the image height across the top, cut into 5
#: cells with grey levels (a, b, c, b, a), a palindrome so that a horizontal flip keeps it; the three
#: digits (base 4) are a fixed permutation of the leaf index, so leaves up to 64 get distinct labels.
LABEL_ROWS = 0.16
_LABEL_GREYS = np.array([20.0, 100.0, 180.0, 250.0], dtype=np.float32)
NOISE_POOL = 16  # distinct noise fields per batch (x4 orientations)
_COLOUR_RGB = np.array([rgb for _, rgb in COLOURS], dtype=np.float32)  # [n_colours, 3]
# background colour per style: classic light, modern dark, vintage sepia, sporty pale blue, cute pastel pink
_STYLE_BG = np.array(
    [[232, 232, 228], [45, 47, 52], [205, 185, 145], [215, 230, 240], [252, 220, 232]], dtype=np.float32
)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Boolean [B, H, W] mask of one shape.

    ``u``/``v`` are rotated, centred coordinates [B, H, W]; ``s`` is the size [B, 1, 1].
    """
    au, av = np.abs(u), np.abs(v)
    if shape == 0:  # circle
        return u * u + v * v < s * s
    if shape == 1:  # square
        return np.maximum(au, av) < 0.8 * s
    if shape == 2:  # triangle, apex up
        return (v > -s) & (v < 0.7 * s) & (au < (v + s) / 1.7 * 0.95)
    if shape == 3:  # diamond
        return au + av < 1.05 * s
    if shape == 4:  # ring
        r2 = u * u + v * v
        return (r2 < s * s) & (r2 > (0.55 * s) ** 2)
    return ((au < 0.3 * s) & (av < s)) | ((av < 0.3 * s) & (au < s))  # cross


def _pattern_field(pattern: int, u: np.ndarray, v: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Share of the secondary colour per pixel [B, H, W] in 0..1 for one pattern."""
    if pattern == 0:  # plain
        return np.zeros_like(u)
    if pattern == 1:  # stripes
        return (np.sin(u * freq) > 0).astype(np.float32)
    if pattern == 2:  # dots
        fu, fv = np.mod(u * freq / np.pi, 1.0) - 0.5, np.mod(v * freq / np.pi, 1.0) - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    if pattern == 3:  # checks
        return ((np.sin(u * freq) > 0) ^ (np.sin(v * freq) > 0)).astype(np.float32)
    return np.clip((v + 1.0) / 2.0, 0.0, 1.0)  # gradient


def _by_group(groups: np.ndarray, fn, *arrays: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Apply ``fn(group, *arrays[sel])`` to each group of items and reassemble [B, ...]."""
    out = None
    for g in np.unique(groups).tolist():
        sel = groups == g
        part = fn(g, *(a[sel] for a in arrays))
        if out is None:
            out = np.zeros((len(groups),) + part.shape[1:], dtype=part.dtype)
        out[sel] = part
    return out


def leaf_label_digits(leaf: np.ndarray) -> np.ndarray:
    """int64 [n, 3]: the label digits (0..3) of each leaf index; distinct for leaves 0..63."""
    code = (np.asarray(leaf, dtype=np.int64) * 29 + 7) % 64  # a bijection of 0..63
    return np.stack([code // 16, (code // 4) % 4, code % 4], axis=1)


def _leaf_label(leaf: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """(grey level [B, size] per column, rows) of the label band of each item."""
    digits = leaf_label_digits(leaf)[:, [0, 1, 2, 1, 0]]  # [B, 5], palindrome
    cell = np.minimum(np.arange(size) * 5 // size, 4)  # [size] column -> cell
    return _LABEL_GREYS[digits[:, cell]], max(1, round(LABEL_ROWS * size))


def render_batch(rng: np.random.Generator, cat: Catalogue, index: np.ndarray, size: int) -> list[bytes]:
    """PNG bytes for the items at ``index`` (catalogue rows), one ``size`` x ``size`` RGB image each."""
    b = len(index)
    f32 = np.float32
    grid = ((np.arange(size, dtype=f32) + 0.5) / size * 2.0 - 1.0).astype(f32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")  # [H, W]
    cx = rng.uniform(-0.15, 0.15, (b, 1, 1)).astype(f32)
    cy = rng.uniform(-0.15, 0.15, (b, 1, 1)).astype(f32)
    s = rng.uniform(0.5, 0.8, (b, 1, 1)).astype(f32)
    theta = rng.uniform(-0.5, 0.5, (b, 1, 1)).astype(f32)
    x, y = xx[None] - cx, yy[None] - cy  # [B, H, W]
    u = np.cos(theta) * x + np.sin(theta) * y
    v = -np.sin(theta) * x + np.cos(theta) * y
    mask = _by_group(cat.shape[index], _shape_mask, u, v, s)[..., None]  # [B, H, W, 1]

    base = (_COLOUR_RGB[cat.colour[index]] + rng.normal(0, 10, (b, 3))).astype(f32)  # [B, 3]
    dark = base.mean(axis=1, keepdims=True) > 128
    secondary = np.where(dark, base * 0.45, base * 0.5 + 127.0).astype(
        f32
    )  # contrasting tone of the same hue
    freq = rng.uniform(9.0, 16.0, (b, 1, 1)).astype(f32)
    share = _by_group(cat.pattern[index], _pattern_field, u, v, freq)[..., None]  # [B, H, W, 1]
    fg = base[:, None, None, :] * (1 - share) + secondary[:, None, None, :] * share  # [B, H, W, 3]
    fg *= (1.0 - 0.12 * v)[..., None]  # top-lit shading of the object

    style = cat.style[index]
    bg = np.broadcast_to(_STYLE_BG[style][:, None, None, :], fg.shape).copy()  # [B, H, W, 3]
    sporty = (style == 3)[:, None, None] & (np.mod((xx + yy)[None] * 6.0, 1.0) < 0.25)  # diagonal lines
    bg[sporty] *= 0.85
    frame = (style == 4)[:, None, None] & ((np.abs(xx) > 0.9) | (np.abs(yy) > 0.9))[None]  # a pink frame
    bg[frame] = (235.0, 120.0, 170.0)
    vintage = np.flatnonzero(style == 2)  # blotchy paper texture
    amp = rng.normal(0, 18, (len(vintage), 1, 1, 1)).astype(f32)
    bg[vintage] += amp * np.sin(xx * 7 + yy * 5)[None, ..., None]

    img = np.where(mask, fg, bg)
    grey, rows = _leaf_label(cat.leaf[index], size)  # drawn over the top rows, object included
    img[:, :rows] = grey[:, None, :, None]
    # sensor noise: a small pool of noise fields, each image takes one in one of 4 orientations
    pool = rng.standard_normal((NOISE_POOL, size, size, 3), dtype=f32) * f32(6.0)  # [P, H, W, 3]
    pool = np.concatenate([pool, pool[:, ::-1], pool[:, :, ::-1], pool[:, ::-1, ::-1]])  # [4P, H, W, 3]
    img += pool[rng.integers(0, len(pool), b)]
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    out = []
    for arr in pixels:
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out
