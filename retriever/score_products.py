"""The score matrix product of the GSU hot path: reusable output buffers and the half-precision choice.

* :func:`scores_into_buffer`: ``targets @ history.T`` written into a per-thread buffer
  (:func:`score_buffer`) that is kept between calls. A fresh ``[100, 100K]`` float32 result is 40 MB of newly mapped pages each time;
  on CPU, faulting them in cost as much as the product itself.
* :func:`native_half_is_faster`: whether a native bfloat16 / float16 matrix product beats
  up-casting the history to float32 on this device. CPUs with AMX (Sapphire Rapids and later) run
  bfloat16 products several times faster than float32; CPUs without native half arithmetic
  (e.g. AVX2 only) emulate it and are slower. It is measured once per process and dtype (a few
  milliseconds) instead of guessed from CPU flags; accelerators always use the native product.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger(__name__)

#: Results smaller than this are allocated per call: reusing a buffer costs more than it saves.
MIN_BUFFER_BYTES = 1 << 20
#: Buffers above this many bytes are not kept between calls (they are allocated per call instead).
MAX_BUFFER_BYTES = 256 << 20
#: Shape of the calibration product: targets x history rows x dim.
CALIBRATION_SHAPE = (64, 16_384, 128)

_local = threading.local()
_half_choice: dict[tuple[str, torch.dtype], bool] = {}
_half_lock = threading.Lock()


def score_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, cols]`` tensor owned by the calling thread, reused across calls (grown as needed)."""
    if device.type != "cpu" or rows * cols * torch.empty((), dtype=dtype).element_size() > MAX_BUFFER_BYTES:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers: dict[torch.dtype, torch.Tensor] = getattr(_local, "buffers", None) or {}
    _local.buffers = buffers
    flat = buffers.get(dtype)
    if flat is None or flat.numel() < rows * cols:
        flat = torch.empty(rows * cols, dtype=dtype)
        buffers[dtype] = flat
    return flat[: rows * cols].view(rows, cols)


def scores_into_buffer(targets: torch.Tensor, history: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``targets [B, d] @ history[L, d]^T -> [B, L]`` in the history's dtype, in a reused buffer;
    with ``transposed``, ``history @ targets^T -> [L, B]`` (see :func:`retriever.block_topk.topk_columns`).

    The result is only valid until the calling thread's next call: consume it (e.g. ``topk``) first.
    """
    t = targets if targets.dtype == history.dtype else targets.to(history.dtype)
    if targets.shape[0] * history.shape[0] * history.element_size() < MIN_BUFFER_BYTES:
        return history @ t.T if transposed else t @ history.T
    if transposed:
        out = score_buffer(history.shape[0], targets.shape[0], history.dtype, history.device)  # [L, B]
        return torch.mm(history, t.T, out=out)
    out = score_buffer(targets.shape[0], history.shape[0], history.dtype, history.device)  # [B, L]
    return torch.mm(t, history.T, out=out)


def _median_ms(fn, reps: int = 5) -> float:  # noqa: ANN001 - a zero-argument callable
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def native_half_is_faster(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a native ``dtype`` (bfloat16 / float16) matrix product is faster than the float32
    product of the up-cast history on ``device``. Measured once per process, device type and dtype."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    key = (device.type, dtype)
    with _half_lock:
        if key in _half_choice:
            return _half_choice[key]
        b, n, d = CALIBRATION_SHAPE
        gen = torch.Generator().manual_seed(0)
        t = torch.randn(b, d, generator=gen)
        h32 = torch.randn(n, d, generator=gen)
        h = h32.to(dtype)
        th = t.to(dtype)
        half_ms = _median_ms(lambda: th @ h.T)
        f32_ms = _median_ms(lambda: t @ h.float().T)
        faster = half_ms < 0.8 * f32_ms
        _half_choice[key] = faster
        log.info(
            "%s product on %s: native %.2f ms vs float32 up-cast %.2f ms -> %s",
            dtype,
            device.type,
            half_ms,
            f32_ms,
            "native" if faster else "float32",
        )
        return faster
