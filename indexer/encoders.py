"""The encoder family: open_clip models with 128-d L2-normalised image and text towers.

One factory (:func:`build_clip_encoder`) turns an :class:`EncoderConfig` into a
:class:`ClipEncoder`. The default architecture, ``muse-tiny-rn``, is a small ResNet (open_clip's
ModifiedResNet) + text transformer; ``muse-tiny`` is the same with a 2-layer ViT image tower. Both are
described by JSON files in ``indexer/model_configs/`` and registered with open_clip at import,
so CPU training of a ``small`` dataset takes minutes. Any other open_clip model name works; its
pretrained weights load from a local file only (nothing is downloaded at run time).

:class:`ItemEncoder` is the inference wrapper the rest of the project uses: it decodes image
bytes (reporting unreadable ones per item, never silently zero), tokenises text, and runs the
model in eval mode on the settings' device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muse.configs import config_from_dict
from muse.errors import ConfigurationError, DataError

log = logging.getLogger(__name__)

#: Folder of the project's own open_clip model configs (one JSON file per architecture).
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
DEFAULT_MODEL = "muse-tiny-rn"
#: Width of every item vector the project stores (the released Taobao-MM vectors are 128-d too).
OUTPUT_DIM = 128
#: open_clip model-name schemas that would fetch files from the network.
_REMOTE_SCHEMAS = ("hf-hub:",)

_configs_registered = False


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's chatter logged on the root logger ("initialized randomly" is expected here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _QuietOpenClip()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def register_model_configs() -> list[str]:
    """Add ``indexer/model_configs/*.json`` to open_clip's registry (idempotent); return their names."""
    global _configs_registered
    import open_clip

    if not _configs_registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _configs_registered = True
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def available_models() -> list[str]:
    """Every open_clip architecture name that :func:`build_clip_encoder` accepts."""
    import open_clip

    register_model_configs()
    return list(open_clip.list_models())


@dataclass(frozen=True)
class EncoderConfig:
    """Which open_clip model to build and how."""

    model: str = DEFAULT_MODEL  # open_clip architecture name (``muse-tiny-rn`` = project default)
    dim: int = OUTPUT_DIM  # output width; a linear head maps open_clip's embed_dim to it if they differ
    pretrained: str | None = None  # local weights file (open_clip state dict) to start from, or None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        """Build from a dict, rejecting unknown keys."""
        return config_from_dict(cls, values, "keys of EncoderConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ClipEncoder(nn.Module):
    """An open_clip model plus (when its embed_dim differs from ``dim``) linear heads to ``dim``.

    Both towers return L2-normalised ``[B, dim]`` float32 vectors.
    """

    def __init__(self, clip: nn.Module, embed_dim: int, dim: int) -> None:
        super().__init__()
        self.clip = clip
        self.dim = dim
        # Identity when the architecture already has the requested width (muse-tiny, muse-tiny-rn: 128).
        self.image_head: nn.Module = nn.Identity() if embed_dim == dim else nn.Linear(embed_dim, dim)
        self.text_head: nn.Module = nn.Identity() if embed_dim == dim else nn.Linear(embed_dim, dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[B, 3, S, S]`` normalised floats -> ``[B, dim]`` unit vectors."""
        z = self.clip.encode_image(images)  # [B, embed_dim]
        return F.normalize(self.image_head(z), dim=-1)  # [B, dim]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[B, context_length]`` int64 -> ``[B, dim]`` unit vectors."""
        z = self.clip.encode_text(tokens)  # [B, embed_dim]
        return F.normalize(self.text_head(z), dim=-1)  # [B, dim]


def _check_model_name(model: str) -> None:
    if model.startswith(_REMOTE_SCHEMAS):
        raise ConfigurationError(
            f"model {model!r} would be downloaded from the Hugging Face Hub; nothing is downloaded at "
            "run time: give an architecture name with --pretrained PATH, or 'local-dir:/folder'"
        )
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigurationError(f"model {model!r}: {folder}/open_clip_config.json does not exist")
        return
    names = available_models()
    if model not in names:
        raise ConfigurationError(f"open_clip model {model!r} not found. Available: {names}")


def build_clip_encoder(config: EncoderConfig) -> ClipEncoder:
    """Create the open_clip model of ``config`` (random init, or weights from ``config.pretrained``).

    Raises:
        ConfigurationError: unknown model name, a remote model, or a pretrained path that is not a file.
    """
    import open_clip

    _check_model_name(config.model)
    if config.pretrained is not None and not Path(config.pretrained).is_file():
        raise ConfigurationError(
            f"pretrained={config.pretrained!r} is not a file; pretrained open_clip weights load from a "
            "local file only (nothing is downloaded)"
        )
    if config.dim <= 0:
        raise ConfigurationError(f"dim={config.dim} must be positive")
    try:
        with _quiet_open_clip():
            clip = open_clip.create_model(
                config.model,
                pretrained=config.pretrained,
                pretrained_image=False,
                pretrained_text=False,  # never fetch default Hugging Face text towers
            )
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigurationError(f"cannot build open_clip model {config.model!r}: {e}") from e
    embed_dim = int(clip.text_projection.shape[-1]) if _has_text_projection(clip) else _probe_dim(clip)
    return ClipEncoder(clip, embed_dim, config.dim)


def get_tokenizer(model: str) -> Any:
    """open_clip's tokenizer for ``model`` (the simple BPE tokenizer ships inside the package)."""
    import open_clip

    register_model_configs()
    with _quiet_open_clip():
        return open_clip.get_tokenizer(model)


def _has_text_projection(clip: nn.Module) -> bool:
    proj = getattr(clip, "text_projection", None)
    return isinstance(proj, torch.Tensor) and proj.ndim == 2


def _probe_dim(clip: nn.Module) -> int:
    """embed_dim of models whose text tower has no plain projection matrix (run one tiny batch)."""
    size = _image_size(clip)
    with torch.no_grad():
        was_training = clip.training
        clip.eval()
        out = clip.encode_image(torch.zeros(1, 3, size, size))
        clip.train(was_training)
    return int(out.shape[-1])


def _image_size(clip: nn.Module) -> int:
    size = getattr(clip.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Decodes image bytes to ``uint8 [3, S, S]`` and normalises batches for the model."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_model(cls, clip: nn.Module) -> ImagePreprocessor:
        visual = clip.visual
        mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        return cls(_image_size(clip), mean, std)  # type: ignore[arg-type]

    def decode(self, data: bytes) -> np.ndarray:
        """PNG/JPEG bytes -> ``uint8 [3, S, S]``.

        Raises:
            DataError: the bytes are empty or not a readable image (the message says why).
        """
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise DataError("empty image bytes")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"unreadable image: {type(e).__name__}: {e}") from e
        if rgb.size != (self.image_size, self.image_size):
            rgb = rgb.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()  # [H, W, 3] -> [3, S, S]

    def to_tensor(self, batch: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """``uint8 [B, 3, S, S]`` -> normalised ``float32 [B, 3, S, S]`` on ``device``."""
        return self.normalise(self.to_unit(batch, device))

    @staticmethod
    def to_unit(batch: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
        """``uint8 [B, 3, S, S]`` -> ``float32 [B, 3, S, S]`` in [0, 1] on ``device``."""
        return torch.as_tensor(batch).to(device=device, dtype=torch.float32) / 255.0

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``float32 [B, 3, S, S]`` in [0, 1] -> the model's normalised input (per-channel mean/std)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class EncodeResult:
    """Vectors of the inputs that encoded, their positions in the input, and why the others failed."""

    vectors: np.ndarray  # float32 [n_ok, d], L2-normalised
    ok_index: np.ndarray  # int64 [n_ok]: position of each vector's input in the request
    failed: dict[int, str]  # input position -> reason (unreadable image, missing image, ...)


class ItemEncoder:
    """A trained (or pretrained) :class:`ClipEncoder` ready for inference: eval mode, no grad, batched."""

    def __init__(
        self,
        model: ClipEncoder,
        model_name: str,
        device: str = "cpu",
        batch_size: int = 256,
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.dim = model.dim
        self.preprocessor = ImagePreprocessor.for_model(model.clip)
        self.tokenizer = get_tokenizer(model_name)

    def encode_images(self, images: Sequence[bytes | None]) -> EncodeResult:
        """Encode image bytes; a missing (None) or unreadable image is reported in ``failed``."""
        decoded: list[np.ndarray] = []
        ok: list[int] = []
        failed: dict[int, str] = {}
        for i, data in enumerate(images):
            if data is None:
                failed[i] = "no image"
                continue
            try:
                decoded.append(self.preprocessor.decode(data))
                ok.append(i)
            except DataError as e:
                failed[i] = str(e)
        if failed:
            log.warning("%d of %d images could not be encoded", len(failed), len(images))
        vectors = self.encode_pixels(np.stack(decoded)) if decoded else np.zeros((0, self.dim), np.float32)
        return EncodeResult(vectors, np.asarray(ok, dtype=np.int64), failed)

    @torch.no_grad()
    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """``uint8 [n, 3, S, S]`` decoded images -> ``float32 [n, d]`` unit vectors."""
        out = []
        for start in range(0, len(pixels), self.batch_size):
            x = self.preprocessor.to_tensor(pixels[start : start + self.batch_size], self.device)
            out.append(self.model.encode_image(x).float().cpu())  # [b, d]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Titles or queries -> ``float32 [n, d]`` unit vectors."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise DataError(f"encode_texts needs strings; input {bad[0]} is {texts[bad[0]]!r}")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())  # [b, d]
        return torch.cat(out).numpy()
