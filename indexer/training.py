"""Training of the embedding sources: one loop, three kinds of pairs (plus learned ID vectors).

``train_source(settings, source, dataset, config)`` builds the pairs (``indexer.pairs``), trains
with the source's loss (``indexer.losses``), saves the checkpoint under
``settings.path("embeddings", source, f"v{version}")`` and registers the new version in the
``embedding_sources`` table. A second training of a source creates version + 1.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexer import pairs as pairs_mod
from indexer.checkpoints import CHECKPOINT_FILE, save_checkpoint
from indexer.encode import open_dataset
from indexer.encoders import (
    DEFAULT_MODEL,
    OUTPUT_DIM,
    ClipEncoder,
    EncoderConfig,
    ImagePreprocessor,
    build_clip_encoder,
    get_tokenizer,
)
from indexer.evaluation import collapse_note, mean_pair_cosine
from indexer.id_embedding import IdEmbedding
from indexer.losses import ClipLoss, QueueInfoNCE, hard_negative_triplet
from indexer.source_registry import (
    ID_SOURCE,
    TRAINED_SOURCES,
    SourceVersion,
    check_registry,
    next_version,
    register_version,
    source_dir,
)
from muse.configs import config_from_dict, read_toml
from muse.errors import ConfigurationError, DataError
from muse.settings import Settings

log = logging.getLogger(__name__)

TRAINABLE_SOURCES = TRAINED_SOURCES + (ID_SOURCE,)


@dataclass(frozen=True)
class EmbedTrainConfig:
    """Options of one training run (defaults sized so ``small`` trains in minutes on 2 CPUs)."""

    epochs: int | None = None  # passes over the (sampled) pairs; None = the source's default (8 scl, 10 id, else 2)
    batch_size: int = 128  # pairs per step; also the number of in-batch negatives
    lr: float = 1e-3  # AdamW learning rate (cosine-decayed to lr/10)
    weight_decay: float = 0.01
    # Softmax temperature of the contrastive losses; None = the source's default (:data:`SOURCE_DEFAULTS`:
    # 0.2 for i2i, whose co-occurrence positives are noisy, 0.07 otherwise).
    temperature: float | None = None
    # Negative queue of QueueInfoNCE (i2i, id, scl); 0 = in-batch negatives only (the default: without a
    # momentum encoder, queued keys are stale and the encoder learns to move every current vector away
    # from them, which collapses all items onto one drifting point; see docs/embeddings.md).
    # A positive value is capped at a quarter of the run's pairs (with a warning).
    queue_size: int = 0
    # MoCo-style momentum key encoder (i2i only): keys come from an EMA copy of the image tower,
    # updated as ``key = m * key + (1 - m) * online`` after every step, so queued keys stay consistent
    # with the current encoder. 0 = no key encoder (keys from the online tower, with gradient).
    momentum: float = 0.0
    # Random geometric augmentation of training images (zoom/crop, small rotation, flip, brightness);
    # colours are kept (colour is half of an interest key). None = the source's default (on for i2i).
    augment: bool | None = None
    # Weight of the same-item term (scl, i2i, openclip): two augmented views of the same item image are
    # a positive pair, the other items of the batch negatives (SimCLR). 0 = off; needs ``augment``.
    # None = the source's default (0.1 for i2i: it keeps different items apart, so i2i cannot collapse).
    view_weight: float | None = None
    hard_weight: float = 1.0  # scl: weight of the clicked-not-purchased triplet term
    margin: float = 0.2  # scl: triplet margin (cosine units)
    max_hard: int = 2  # scl: hard negatives per session
    window: int = 3  # i2i/id: co-occurrence window in history positions
    # Training pairs sampled per run (all sources); None = scale with the catalogue:
    # min(MAX_PAIRS, PAIRS_PER_ITEM x items), so a 600-item world trains in seconds, not minutes.
    max_pairs: int | None = None
    max_steps: int | None = None  # stop after this many steps (tests, quick runs)
    model: str = DEFAULT_MODEL  # open_clip architecture (ignored by id)
    pretrained: str | None = None  # local open_clip weights file to start from
    dim: int = OUTPUT_DIM
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EmbedTrainConfig:
        """Build from a dict, rejecting unknown keys and bad values."""
        return config_from_dict(cls, values, "keys of EmbedTrainConfig")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_hard", "window", "max_pairs", "dim"):  # None = default
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigurationError(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_size < 2:
            raise ConfigurationError(f"batch_size={self.batch_size} must be >= 2 (in-batch negatives)")
        if not self.lr > 0:
            raise ConfigurationError(f"lr={self.lr} must be > 0")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigurationError(f"temperature={self.temperature} must be > 0")
        if self.queue_size < 0:
            raise ConfigurationError(f"queue_size={self.queue_size} must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigurationError(f"max_steps={self.max_steps} must be >= 1")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigurationError(f"momentum={self.momentum} must be in [0, 1)")
        if self.view_weight is not None and self.view_weight < 0:
            raise ConfigurationError(f"view_weight={self.view_weight} must be >= 0")
        if self.view_weight and self.augment is False:
            raise ConfigurationError("view_weight > 0 needs augment=True (two views of one image are identical)")

    def for_source(self, source: str, n_items: int | None = None) -> EmbedTrainConfig:
        """This config with every option left at None set to ``source``'s default (:data:`SOURCE_DEFAULTS`);
        ``max_pairs`` scales with ``n_items``, the dataset's catalogue size (:func:`default_max_pairs`)."""
        defaults = {**GENERIC_DEFAULTS, **SOURCE_DEFAULTS.get(source, {}), "max_pairs": default_max_pairs(n_items)}
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.view_weight and self.augment is None:
            filled["augment"] = True  # asking for the view term implies augmentation
        return dataclasses.replace(self, **filled)

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(model=self.model, dim=self.dim, pretrained=self.pretrained)


#: Most training pairs a run samples by default (``small``, 20,000 items, reaches it) ...
MAX_PAIRS = 10_000
#: ... and pairs per catalogue item below that: the step count follows the data, so ``tiny`` (600
#: items) trains each source in seconds (docs/embeddings.md, ``python -m bench.embed_train``).
PAIRS_PER_ITEM = 4


def default_max_pairs(n_items: int | None) -> int:
    """Training pairs sampled by default for a catalogue of ``n_items`` (None: :data:`MAX_PAIRS`)."""
    if n_items is None:
        return MAX_PAIRS
    return max(256, min(MAX_PAIRS, PAIRS_PER_ITEM * int(n_items)))


#: Folder of the per-source training defaults: ``generic.toml`` (every source) and ``<source>.toml``
#: (where a source differs), with the reasons for the values beside them.
TRAIN_DEFAULTS_DIR = Path(__file__).resolve().parent / "train_defaults"
GENERIC_DEFAULTS_NAME = "generic"


@functools.cache
def load_train_defaults(directory: Path = TRAIN_DEFAULTS_DIR) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(generic defaults, source -> its differing defaults) from ``directory``'s TOML files, read once.

    Raises:
        ConfigurationError: a file is not valid TOML, or names a key that is not a field of
            :class:`EmbedTrainConfig`.
    """
    fields = {f.name for f in dataclasses.fields(EmbedTrainConfig)}
    generic: dict[str, Any] = {}
    per_source: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        values = read_toml(path, f"training defaults {path}")
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigurationError(f"training defaults {path}: unknown key(s) {', '.join(unknown)}; "
                                     f"valid: {', '.join(sorted(fields))}")
        if path.stem == GENERIC_DEFAULTS_NAME:
            generic = values
        else:
            per_source[path.stem] = values
    if not generic:
        raise ConfigurationError(f"training defaults: {directory}/{GENERIC_DEFAULTS_NAME}.toml is missing or empty")
    return generic, per_source


#: Values of the options a :class:`EmbedTrainConfig` leaves at None, for every source (``generic.toml``) ...
#: ... and where a source differs (``<source>.toml``); the files say why (:data:`TRAIN_DEFAULTS_DIR`).
GENERIC_DEFAULTS, SOURCE_DEFAULTS = load_train_defaults()


@dataclass(frozen=True)
class TrainResult:
    source: SourceVersion  # the registered row
    model: torch.nn.Module  # the trained model (CPU, eval mode), as saved in the checkpoint
    losses: list[float]  # loss of every step
    seconds: float
    n_pairs: int


class ImageBank:
    """Decoded images of the items a run needs, as ``uint8 [n, 3, S, S]`` rows keyed by item id."""

    def __init__(self, dataset: Any, item_ids: np.ndarray, preprocessor: ImagePreprocessor) -> None:
        wanted = np.unique(np.asarray(item_ids, dtype=np.int64))
        raw = dataset.load_images(wanted)
        rows: list[np.ndarray] = []
        self.index: dict[int, int] = {}
        self.failed: dict[int, str] = {}
        for iid in wanted.tolist():
            data = raw.get(iid)
            if data is None:
                self.failed[iid] = "no image"
                continue
            try:
                rows.append(preprocessor.decode(data))
            except DataError as e:
                self.failed[iid] = str(e)
                continue
            self.index[iid] = len(rows) - 1
        if self.failed:
            log.warning("%d of %d training images are missing or unreadable; their pairs are skipped",
                        len(self.failed), len(wanted))
        size = preprocessor.image_size
        self.pixels = np.stack(rows) if rows else np.zeros((0, 3, size, size), np.uint8)  # [n, 3, S, S]
        self.preprocessor = preprocessor

    def has(self, item_ids: np.ndarray) -> np.ndarray:
        """bool mask of the items whose image decoded."""
        return np.fromiter((int(i) in self.index for i in np.asarray(item_ids).ravel()), bool,
                           count=np.asarray(item_ids).size).reshape(np.shape(item_ids))

    def batch(self, item_ids: np.ndarray, device: str, augment: torch.Generator | None = None) -> torch.Tensor:
        """item ids ``[B]`` -> normalised images ``[B, 3, S, S]`` on ``device``.

        With ``augment`` (a seeded generator) every image gets a random view (:func:`augment_images`).
        """
        rows = [self.index[int(i)] for i in item_ids]
        x = self.preprocessor.to_unit(self.pixels[rows], device)  # [B, 3, S, S] in [0, 1]
        if augment is not None:
            x = augment_images(x, augment)
        return self.preprocessor.normalise(x)


def augment_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of each image of ``x`` (``float32 [B, 3, S, S]`` in [0, 1]), same shape and range.

    Per image: zoom 0.8-1.15 (a crop when > 1), rotation up to 0.3 rad, shift up to 10% of the side, a
    horizontal flip half of the time (reflection fills the border), and brightness x0.85-1.15. Hue
    and saturation are kept: an item's colour is half of its interest key.
    """
    b = len(x)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)  # [B] on CPU (the generator's device)

    scale = 1.0 / uniform(0.8, 1.15)  # sampling-grid scale: < 1 zooms in
    angle = uniform(-0.3, 0.3)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, uniform(-0.1, 0.1)], dim=1),
        torch.stack([sin * flip, cos, uniform(-0.1, 0.1)], dim=1),
    ], dim=1).to(x.device)  # [B, 2, 3]
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = uniform(0.85, 1.15).to(x.device).view(b, 1, 1, 1)
    return (out * brightness).clamp(0.0, 1.0)


class MomentumKeyEncoder:
    """A frozen copy of a model whose weights follow the online model's as an exponential moving average.

    MoCo's key encoder: keys computed by it (no gradient) change slowly, so keys queued a few steps
    ago are still comparable with the current ones. :meth:`update` after every optimiser step sets
    ``key = momentum * key + (1 - momentum) * online`` for every parameter, and copies the buffers
    (BatchNorm running statistics).
    """

    def __init__(self, model: torch.nn.Module, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigurationError(f"momentum={momentum} must be in [0, 1)")
        self.momentum = momentum
        self.online = model
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for k, q in zip(self.model.parameters(), self.online.parameters()):
            k.mul_(self.momentum).add_(q.detach(), alpha=1.0 - self.momentum)
        for k, q in zip(self.model.buffers(), self.online.buffers()):
            k.copy_(q)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled index batches; a last batch smaller than 2 is dropped (no negatives)."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) >= 2:
            yield idx


class _Task:
    """The pairs and the loss of one source: ``n`` pairs, ``loss(idx)`` for a batch of pair indexes."""

    n: int
    model: torch.nn.Module
    queue_size: int = 0  # negative queue length actually used (after the cap)

    def loss(self, idx: np.ndarray) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimiser step (the momentum key encoder's update)."""


class _Views:
    """Augmentation and the same-item term of a run: two random views of an item image are positives.

    ``rng`` is None when augmentation is off (``ImageBank.batch`` then returns the plain images).
    Tasks get their config from :meth:`EmbedTrainConfig.for_source`, so no option here is None.
    """

    def __init__(self, cfg: EmbedTrainConfig, device: str) -> None:
        self.rng = torch.Generator().manual_seed(cfg.seed + 1) if cfg.augment else None
        self.weight = cfg.view_weight
        self.criterion = QueueInfoNCE(cfg.dim, 0, cfg.temperature).to(device) if self.weight > 0 else None
        self.device = device

    def loss(self, encoder: Any, bank: ImageBank, item_ids: np.ndarray, first: torch.Tensor) -> torch.Tensor | float:
        """``weight`` x InfoNCE(first view, second view) over the batch; ``first`` ``[B, d]`` is already
        encoded (with gradient); ``encoder`` (the online model or the key encoder) encodes the second."""
        if self.criterion is None:
            return 0.0
        # A key encoder's parameters do not require grad, so it records no graph by itself.
        second = encoder.encode_image(bank.batch(item_ids, self.device, self.rng))  # [B, d]
        ids = torch.as_tensor(item_ids, device=self.device)
        return self.weight * self.criterion(first, second, ids)  # other copies of the same item are masked


class _ClipTask(_Task):
    """OpenCLIP: item image <-> title, symmetric CLIP loss."""

    def __init__(self, model: ClipEncoder, dataset: Any, cfg: EmbedTrainConfig, device: str, tokenizer: Any) -> None:
        tp = pairs_mod.title_pairs(dataset)
        keep_n = _sample(len(tp.item_ids), cfg.max_pairs, cfg.seed)
        tp = pairs_mod.TitlePairs(tp.item_ids[keep_n], [tp.titles[i] for i in keep_n])
        self.bank = ImageBank(dataset, tp.item_ids, ImagePreprocessor.for_model(model.clip))
        keep = self.bank.has(tp.item_ids)
        self.item_ids = tp.item_ids[keep]
        self.titles = [t for t, k in zip(tp.titles, keep) if k]
        self.n, self.model, self.device, self.tokenizer = len(self.item_ids), model, device, tokenizer
        self.criterion = ClipLoss(cfg.temperature)
        self.views = _Views(cfg, device)

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        ids = self.item_ids[idx]
        img = self.model.encode_image(self.bank.batch(ids, self.device, self.views.rng))  # [B, d]
        tokens = self.tokenizer([self.titles[i] for i in idx]).to(self.device)  # [B, ctx]
        loss = self.criterion(img, self.model.encode_text(tokens))
        return loss + self.views.loss(self.model, self.bank, ids, img)


def _sample(n: int, max_n: int, seed: int) -> np.ndarray:
    """Sorted indexes of at most ``max_n`` of ``n`` rows (all when ``n <= max_n``)."""
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


#: The queue may hold at most this share of the run's training pairs (stale copies of current positives).
QUEUE_MAX_SHARE = 0.25


def effective_queue_size(requested: int, n_pairs: int, source: str = "") -> int:
    """``requested`` capped at :data:`QUEUE_MAX_SHARE` of ``n_pairs`` (logging a warning when capped).

    A queue as long as the training set holds a stale copy of every item, so most of its negatives are
    out-of-date vectors of the current positives' neighbours.
    """
    if requested < 0:
        raise ConfigurationError(f"queue_size={requested} must be >= 0")
    cap = int(n_pairs * QUEUE_MAX_SHARE)
    if requested > cap:
        log.warning("%squeue_size=%d is more than %d%% of the %d training pairs; using %d",
                    f"{source}: " if source else "", requested, int(QUEUE_MAX_SHARE * 100), n_pairs, cap)
        return cap
    return requested


def _flip_half(pairs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Swap a random half of (a, b) pairs so that both directions are learned."""
    flip = rng.random(len(pairs)) < 0.5
    out = pairs.copy()
    out[flip] = pairs[flip][:, ::-1]
    return out


class _I2ITask(_Task):
    """I2I: image of an item <-> image of a co-occurring item, InfoNCE with a negative queue."""

    def __init__(self, model: ClipEncoder, dataset: Any, cfg: EmbedTrainConfig, device: str) -> None:
        raw = pairs_mod.cooccurrence_pairs(dataset, "train", cfg.window, cfg.max_pairs, cfg.seed)
        self.bank = ImageBank(dataset, raw.ravel(), ImagePreprocessor.for_model(model.clip))
        pairs = raw[self.bank.has(raw).all(axis=1)]
        self.pairs = _flip_half(pairs, np.random.default_rng(cfg.seed))  # [n, 2]
        self.n, self.model, self.device = len(self.pairs), model, device
        self.queue_size = effective_queue_size(cfg.queue_size, self.n, "i2i")
        self.criterion = QueueInfoNCE(cfg.dim, self.queue_size, cfg.temperature).to(device)
        self.views = _Views(cfg, device)
        self.keys = MomentumKeyEncoder(model, cfg.momentum) if cfg.momentum > 0 else None

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        a, b = self.pairs[idx, 0], self.pairs[idx, 1]
        q = self.model.encode_image(self.bank.batch(a, self.device, self.views.rng))  # [B, d]
        if self.keys is None:
            key_model: Any = self.model
            k = self.model.encode_image(self.bank.batch(b, self.device, self.views.rng))  # [B, d]
        else:
            key_model = self.keys.model
            with torch.no_grad():
                k = key_model.encode_image(self.bank.batch(b, self.device, self.views.rng))  # [B, d]
        loss = self.criterion(q, k, torch.as_tensor(b, device=self.device), torch.as_tensor(a, device=self.device))
        return loss + self.views.loss(key_model, self.bank, a, q)  # MoCo: the second view from the key encoder

    def after_step(self) -> None:
        if self.keys is not None:
            self.keys.update()


class _IdTask(_Task):
    """ID: learned vector of an item <-> vector of a co-occurring item (same pairs as I2I, no content)."""

    def __init__(self, model: IdEmbedding, dataset: Any, cfg: EmbedTrainConfig, device: str) -> None:
        raw = pairs_mod.cooccurrence_pairs(dataset, "train", cfg.window, cfg.max_pairs, cfg.seed)
        _, known = model.rows(raw.ravel())
        keep = known.reshape(-1, 2).all(axis=1)
        self.pairs = _flip_half(raw[keep], np.random.default_rng(cfg.seed))
        self.rows = model.rows(self.pairs.ravel())[0].reshape(-1, 2)  # [n, 2] table rows
        self.n, self.model, self.device = len(self.pairs), model, device
        self.queue_size = effective_queue_size(cfg.queue_size, self.n, "id")
        self.criterion = QueueInfoNCE(cfg.dim, self.queue_size, cfg.temperature).to(device)

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        rows = torch.as_tensor(self.rows[idx], device=self.device)  # [B, 2]
        q, k = self.model(rows[:, 0]), self.model(rows[:, 1])  # [B, d] each
        return self.criterion(q, k, rows[:, 1], rows[:, 0])


class _SclTask(_Task):
    """SCL: query text <-> image of the purchased item (InfoNCE + queue), plus a triplet term that
    pushes the query away from items clicked but not purchased in the same session."""

    def __init__(self, model: ClipEncoder, dataset: Any, cfg: EmbedTrainConfig, device: str, tokenizer: Any) -> None:
        sp = pairs_mod.search_pairs(dataset, "train", cfg.max_hard)
        keep_n = _sample(len(sp.purchased), cfg.max_pairs, cfg.seed)
        sp = pairs_mod.SearchPairs([sp.queries[i] for i in keep_n], sp.purchased[keep_n], sp.hard_negatives[keep_n])
        needed = np.concatenate([sp.purchased, sp.hard_negatives[sp.hard_negatives >= 0]])
        self.bank = ImageBank(dataset, needed, ImagePreprocessor.for_model(model.clip))
        keep = self.bank.has(sp.purchased)
        self.queries = [q for q, k in zip(sp.queries, keep) if k]
        self.purchased = sp.purchased[keep]
        hard = sp.hard_negatives[keep]
        hard[(hard >= 0) & ~self.bank.has(np.maximum(hard, 0))] = -1  # drop negatives without an image
        self.hard = hard  # [n, H]
        self.n, self.model, self.device, self.tokenizer = len(self.purchased), model, device, tokenizer
        self.queue_size = effective_queue_size(cfg.queue_size, self.n, "scl")
        self.criterion = QueueInfoNCE(cfg.dim, self.queue_size, cfg.temperature).to(device)
        self.hard_weight, self.margin = cfg.hard_weight, cfg.margin
        self.views = _Views(cfg, device)

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        tokens = self.tokenizer([self.queries[i] for i in idx]).to(self.device)  # [B, ctx]
        q = self.model.encode_text(tokens)  # [B, d]
        pos_ids = self.purchased[idx]
        pos = self.model.encode_image(self.bank.batch(pos_ids, self.device, self.views.rng))  # [B, d]
        loss = self.criterion(q, pos, torch.as_tensor(pos_ids, device=self.device))
        loss = loss + self.views.loss(self.model, self.bank, pos_ids, pos)
        hard = self.hard[idx]  # [B, H]
        mask = hard >= 0
        if self.hard_weight > 0 and mask.any():
            neg_flat = self.model.encode_image(self.bank.batch(hard[mask], self.device, self.views.rng))  # [m, d]
            neg = torch.zeros(*hard.shape, q.shape[1], device=self.device)  # [B, H, d]
            neg[torch.as_tensor(mask, device=self.device)] = neg_flat
            mask_t = torch.as_tensor(mask, device=self.device, dtype=q.dtype)
            loss = loss + self.hard_weight * hard_negative_triplet(q, pos, neg, mask_t, self.margin)
        return loss


def _build_task(source: str, dataset: Any, cfg: EmbedTrainConfig, device: str) -> _Task:
    if source == ID_SOURCE:
        model: torch.nn.Module = IdEmbedding(np.sort(dataset.item_ids()), cfg.dim).to(device)
        return _IdTask(model, dataset, cfg, device)  # type: ignore[arg-type]
    clip = build_clip_encoder(cfg.encoder_config()).to(device)
    if source == "openclip":
        return _ClipTask(clip, dataset, cfg, device, get_tokenizer(cfg.model))
    if source == "i2i":
        return _I2ITask(clip, dataset, cfg, device)
    return _SclTask(clip, dataset, cfg, device, get_tokenizer(cfg.model))


def train_source(
    settings: Settings, source: str, dataset: Any, config: EmbedTrainConfig | None = None, progress: bool = False
) -> TrainResult:
    """Train ``source`` on ``dataset`` (a Dataset or its name), save and register a new version.

    Args:
        progress: show a tqdm progress bar with the running loss (the CLI turns it on).
    Raises:
        ConfigurationError: unknown source or bad option. DataError: the dataset lacks the pairs.
    """
    if source not in TRAINABLE_SOURCES:
        raise ConfigurationError(f"cannot train source {source!r}; trainable: {', '.join(TRAINABLE_SOURCES)}")
    check_registry(settings)  # fail now, not after minutes of training
    dataset = open_dataset(settings, dataset)
    cfg = (config or EmbedTrainConfig()).for_source(source, len(dataset.item_ids()))
    if cfg.momentum > 0 and source != "i2i":
        log.warning("momentum=%s is used by i2i only; %s trains without a key encoder", cfg.momentum, source)
    device = settings.resolve_device()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    task = _build_task(source, dataset, cfg, device)
    if task.n < 2:
        raise DataError(f"dataset {dataset.name!r} yields {task.n} training pairs for {source}; need >= 2")
    steps_per_epoch = math.ceil(task.n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs  # cfg.epochs is set by for_source
    if cfg.max_steps is not None:
        total = min(cfg.max_steps, total)
    params = [p for p in task.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_lr_factor, total=total))
    log.info("training %s on %s: %d pairs, %d steps", source, dataset.name, task.n, total)
    losses = _run_steps(task, optimizer, schedule, cfg, total, progress, f"{source} on {dataset.name} ({task.n:,} pairs)")
    recalibrate_batchnorm(task)
    mean_cos = spread_of(task)
    seconds = time.perf_counter() - t0
    note = collapse_note(mean_cos)
    if note:
        log.warning("%s on %s: %s; train longer (--epochs) or see docs/embeddings.md", source, dataset.name, note)

    version = next_version(settings, source)
    ckpt = source_dir(settings, source, version) / CHECKPOINT_FILE
    task.model.eval()
    save_checkpoint(ckpt, source=source, model=task.model.cpu(),
                    encoder=None if source == ID_SOURCE else cfg.encoder_config())
    train_metrics = {
        "steps": len(losses), "n_pairs": task.n, "seconds": round(seconds, 2), "device": device,
        "queue_size": task.queue_size, "loss_first": losses[0], "mean_cosine": mean_cos,
        "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])),
    }
    row = register_version(
        settings, source, version, kind="id" if source == ID_SOURCE else "trained", dim=cfg.dim,
        dataset_name=dataset.name, checkpoint_path=ckpt, config=dataclasses.asdict(cfg),
        metrics={"train": train_metrics},
    )
    log.info("%s v%d trained in %.1fs, loss %.3f -> %.3f", source, version, seconds,
             train_metrics["loss_first"], train_metrics["loss_last"])
    return TrainResult(row, task.model, losses, seconds, task.n)


#: Images per forward pass of the BatchNorm recalibration and of the spread check, and how many at most.
_CALIBRATION_BATCH = 256
_CALIBRATION_IMAGES = 2048


def _bank_of(task: _Task) -> ImageBank | None:
    return getattr(task, "bank", None)


@torch.no_grad()
def recalibrate_batchnorm(task: _Task) -> None:
    """Recompute the BatchNorm running statistics of the image tower over the run's images.

    Why: in eval mode BatchNorm normalises with running averages (momentum 0.1, starting at mean 0 /
    variance 1). After a short run (``tiny``: 8 scl steps, 17 updates) they are still far from the
    real activation statistics, and the error compounds through the layers until every image maps to
    nearly the same vector: the ``tiny`` scl encoder gave cosine 0.997 between random items in eval
    mode against 0.67 with batch statistics. Averaging the statistics exactly over the training
    images (cumulative average, no gradient, weights unchanged) makes eval mode match training.
    """
    bank = _bank_of(task)
    norms = [m for m in task.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bank is None or not norms or not len(bank.pixels):
        return
    device = next(task.model.parameters()).device
    was_training = task.model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    task.model.train()
    n = min(len(bank.pixels), _CALIBRATION_IMAGES)
    order = np.random.default_rng(0).permutation(len(bank.pixels))[:n]
    for start in range(0, n, _CALIBRATION_BATCH):
        rows = order[start : start + _CALIBRATION_BATCH]
        if len(rows) < 2:
            break
        x = bank.preprocessor.to_tensor(bank.pixels[rows], device)
        task.model.encode_image(x)  # type: ignore[attr-defined]
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    task.model.train(was_training)


@torch.no_grad()
def spread_of(task: _Task) -> float | None:
    """Mean cosine between random different items under the trained model (eval mode): ~0 is spread
    out, > :data:`indexer.evaluation.COLLAPSE_COSINE` a collapse."""
    was_training = task.model.training
    task.model.eval()
    try:
        if isinstance(task.model, IdEmbedding):
            vectors = task.model(torch.arange(task.model.table.num_embeddings, device=task.model.table.weight.device))
            return mean_pair_cosine(vectors.float().cpu().numpy())
        bank = _bank_of(task)
        if bank is None or len(bank.pixels) < 2:
            return None
        device = next(task.model.parameters()).device
        rows = np.random.default_rng(1).permutation(len(bank.pixels))[:_CALIBRATION_IMAGES // 2]
        out = [task.model.encode_image(bank.preprocessor.to_tensor(bank.pixels[rows[i : i + _CALIBRATION_BATCH]], device))  # type: ignore[attr-defined]
               for i in range(0, len(rows), _CALIBRATION_BATCH)]
        return mean_pair_cosine(torch.cat(out).float().cpu().numpy())
    finally:
        task.model.train(was_training)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5% of steps (at most 100), then cosine decay to 1/10."""
    warmup = max(1, min(100, total // 20))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(step - warmup, total) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _run_steps(
    task: _Task, optimizer: torch.optim.Optimizer, schedule: Any, cfg: EmbedTrainConfig, total: int,
    progress: bool, desc: str,
) -> list[float]:
    from tqdm import tqdm

    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    task.model.train()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        while len(losses) < total:
            for idx in _batches(task.n, cfg.batch_size, rng):
                loss = task.loss(idx)
                if not torch.isfinite(loss):
                    raise DataError(f"{desc}: loss became {loss.item()} at step {len(losses)}; lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                task.after_step()
                schedule.step()
                losses.append(float(loss.item()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if len(losses) % 50 == 0:
                    log.info("%s step %d/%d loss %.4f", desc, len(losses), total, losses[-1])
                if len(losses) >= total:
                    break
    return losses
