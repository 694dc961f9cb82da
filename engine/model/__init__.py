"""GGUF models: the embedded default and where models live (ModelSpec comes with the planner)."""

from .catalog import DEFAULT_MODEL_NAME, ModelMissing, default_model_path, fetch_default_model

__all__ = ["DEFAULT_MODEL_NAME", "ModelMissing", "default_model_path", "fetch_default_model"]
