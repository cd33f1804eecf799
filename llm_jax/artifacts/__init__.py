"""Trained models on disk: run directories, packages, and the one function that opens either."""

from llm_jax.artifacts.errors import ArtifactError
from llm_jax.artifacts.opened import OpenedModel, inference_config, kind_of, open_model

__all__ = ["ArtifactError", "OpenedModel", "inference_config", "kind_of", "open_model"]
