"""Hugging Face checkpoint directories out: `write_hf` writes config.json, model.safetensors and the
tokenizer's files that `transformers`' AutoModelForCausalLM and AutoTokenizer load offline (reading
them back is `llm_jax.artifacts.hf`). Tensors are only moved and reshaped: float32 weights round-trip
bitwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from llm_jax.artifacts import hf_names, outdir
from llm_jax.artifacts.hf import ARCHITECTURES, CONFIG, GPT2, LLAMA, WEIGHTS, HFError
from llm_jax.data import hf_tokenizer
from llm_jax.model import ModelConfig, stack_layers
from llm_jax.model import quantize as quantize_lib


def family_for(cfg: ModelConfig) -> str:
  """The Hugging Face family that runs `cfg`: learned+layernorm+gelu -> gpt2, rope+rmsnorm+swiglu -> llama."""
  if (cfg.positions, cfg.norm, cfg.activation) == ("learned", "layernorm", "gelu"):
    if not cfg.use_bias or cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.d_model:
      raise HFError(
        "a GPT-2 export needs use_bias=True, num_kv_heads == num_heads and "
        f"head_dim * num_heads == d_model (got use_bias={cfg.use_bias}, "
        f"num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim})"
      )
    return GPT2
  if (cfg.positions, cfg.norm, cfg.activation) == ("rope", "rmsnorm", "swiglu"):
    return LLAMA
  raise HFError(
    f"model with positions={cfg.positions}, norm={cfg.norm}, activation={cfg.activation} "
    "has no Hugging Face counterpart: only learned+layernorm+gelu (GPT-2) and "
    "rope+rmsnorm+swiglu (LLaMA) export"
  )


def hf_config_for(cfg: ModelConfig, tokenizer=None, dtype: str = "float32", stop_ids=()) -> dict:
  """config.json for `cfg` (GPT2LMHeadModel or LlamaForCausalLM); `stop_ids` (end-of-text ids besides
  the tokenizer's EOS) make eos_token_id a list, as LLaMA-3 instruct writes it."""
  family = family_for(cfg)
  ids = {}
  if tokenizer is not None:
    eos = int(tokenizer.eos_id)
    ids = {
      "bos_token_id": int(tokenizer.bos_id),
      "eos_token_id": [eos, *(int(i) for i in stop_ids if int(i) != eos)] if stop_ids else eos,
      # a tokenizer without pad pads with EOS here, but naming EOS as pad makes HF collators mask it
      "pad_token_id": int(tokenizer.pad_id) if getattr(tokenizer, "has_pad", True) else None,
    }
  common = {
    "architectures": [ARCHITECTURES[family]],
    "model_type": family,
    "torch_dtype": dtype,
    "vocab_size": cfg.vocab_size,
    "tie_word_embeddings": cfg.tie_embeddings,
    **ids,
  }
  if family == GPT2:
    return {
      **common,
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "n_positions": cfg.max_seq_len,
      "n_ctx": cfg.max_seq_len,
      "activation_function": "gelu_new",
      "layer_norm_epsilon": cfg.norm_eps,
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
    }
  rope_scaling = None
  if cfg.rope_scaling == "linear":
    rope_scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    rope_scaling = {
      "rope_type": "llama3",
      "factor": cfg.rope_scaling_factor,
      "low_freq_factor": cfg.rope_low_freq_factor,
      "high_freq_factor": cfg.rope_high_freq_factor,
      "original_max_position_embeddings": cfg.rope_original_max_len,
    }
  return {
    **common,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_scaling": rope_scaling,
    "hidden_act": "silu",
    "attention_bias": cfg.use_bias,
    "mlp_bias": cfg.use_bias,
    "attention_dropout": 0.0,
  }


def _host_params(params, cfg: ModelConfig):
  """Unboxed, dequantized, scanned float32 numpy parameters."""
  params = nn.meta.unbox(params)
  if quantize_lib.has_qtensors(params):
    params = quantize_lib.dequantize(params)
  params, _ = stack_layers(params, cfg)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(np.float32), params)


def write_hf(
  out_dir: str,
  params,
  model_config: ModelConfig,
  tokenizer,
  *,
  weights_dtype: str = "float32",
  overwrite: bool = False,
  stop_ids=(),
  chat_turn: str | None = None,
) -> list[str]:
  """Writes config.json, model.safetensors and tokenizer files that transformers loads; returns names.

  The directory is built next to `out_dir` and renamed into place. int8 parameters are dequantized.
  """
  if weights_dtype not in ("float32", "bfloat16"):
    raise HFError(f"weights_dtype={weights_dtype!r} is not one of float32, bfloat16")
  family = family_for(model_config)
  outdir.check_out(
    out_dir, overwrite=overwrite, markers=(CONFIG, WEIGHTS), what="Hugging Face checkpoint", error=HFError
  )
  tensors = hf_names.hf_from_params(_host_params(params, model_config), model_config, family)
  if weights_dtype == "bfloat16":
    tensors = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
  config = hf_config_for(model_config, tokenizer, weights_dtype, stop_ids)
  parent = os.path.dirname(os.path.abspath(out_dir)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".hf-", dir=parent)
  try:
    save_file(
      {k: np.ascontiguousarray(v) for k, v in tensors.items()},
      os.path.join(tmp, WEIGHTS),
      metadata={"format": "pt"},
    )
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    names = [CONFIG, WEIGHTS]
    if tokenizer is not None:
      names += hf_tokenizer.save_hf_tokenizer(tokenizer, tmp, model_config.max_seq_len, chat_turn)
    outdir.move_into_place(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info(
    "wrote Hugging Face %s checkpoint %s (%d tensors)", ARCHITECTURES[family], out_dir, len(tensors)
  )
  return names
