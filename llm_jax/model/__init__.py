"""Flax decoder and its settings; knows logical axis names, nothing about meshes."""

from llm_jax.model.config import ModelConfig
from llm_jax.model.levers import default_levers
from llm_jax.model.params import stack_layers, unstack_layers
from llm_jax.model.partitioning import constraint_mesh
from llm_jax.model.transformer import Decoder

__all__ = ["Decoder", "ModelConfig", "constraint_mesh", "default_levers", "stack_layers", "unstack_layers"]
