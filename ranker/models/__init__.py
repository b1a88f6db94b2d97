"""CTR models (DIN, SIM-hard, SIM-soft, TWIN, MUSE) by name, sharing one ``forward(batch) -> dict``."""

from ranker.models.base import CTRModel
from ranker.models.config import ESU_VARIANTS, FeatureSpec, ModelConfig
from ranker.models.registry import build_model, list_models, make_config, model_class

__all__ = [
    "CTRModel",
    "ESU_VARIANTS",
    "FeatureSpec",
    "ModelConfig",
    "build_model",
    "list_models",
    "make_config",
    "model_class",
]
