"""GGUF models: the embedded default, where models live, and ModelSpec (what the planner reads)."""

from .catalog import DEFAULT_MODEL_NAME, ModelMissing, default_model_path, fetch_default_model
from .spec import LayerSpec, ModelError, ModelSpec, read_model_spec

__all__ = [
    "DEFAULT_MODEL_NAME",
    "LayerSpec",
    "ModelError",
    "ModelMissing",
    "ModelSpec",
    "default_model_path",
    "fetch_default_model",
    "read_model_spec",
]
