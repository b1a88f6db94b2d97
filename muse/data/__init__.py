"""Data sources and the dataset format: the Taobao-MM reader, the synthetic shopping world, stats.

Names are imported lazily so that ``import muse.data`` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Dataset": "muse.data.format",
    "DatasetWriter": "muse.data.format",
    "register_dataset": "muse.data.registry",
    "generate_simworld": "muse.data.simworld",
    "import_taobao_mm": "muse.data.taobao_mm",
    "dataset_stats": "muse.data.stats",
    "iter_cooccurrence_pairs": "muse.data.pairs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'muse.data' has no attribute {name!r}")
