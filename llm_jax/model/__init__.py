"""Flax decoder and its settings; knows logical axis names, nothing about meshes."""
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Decoder, stack_layers, unstack_layers

__all__ = ["Decoder", "ModelConfig", "stack_layers", "unstack_layers"]
