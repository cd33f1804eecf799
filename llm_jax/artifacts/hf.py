"""Hugging Face checkpoint directories in: GPT-2 (GPT2LMHeadModel) and LLaMA (LlamaForCausalLM).

A directory holds config.json, model.safetensors (or model.safetensors.index.json with its shards) and
tokenizer files. `read_hf` turns one into float32 parameters in the Decoder's scanned layout, a
ModelConfig, a tokenizer (llm_jax.data.hf_tokenizer) and a provenance dict; `hf_write.write_hf` writes
what `transformers`' AutoModelForCausalLM and AutoTokenizer load offline. Both directions only move
and reshape tensors, so float32 weights round-trip bitwise. The tensor names are in hf_names.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from llm_jax.artifacts import hf_names
from llm_jax.data import hf_tokenizer
from llm_jax.model import ModelConfig

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


class HFError(ValueError):
  """A Hugging Face checkpoint is missing a file, malformed, or of an architecture we cannot run."""


def _read_config(path: str, name: str = CONFIG) -> dict:
  """A JSON object file of the checkpoint directory (config.json unless `name`)."""
  file = os.path.join(path, name)
  try:
    with open(file, encoding="utf-8") as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise HFError(f"cannot read {file}: {e}") from e
  if not isinstance(hf, dict):
    raise HFError(f"{file} is not a JSON object")
  return hf


def is_hf_dir(path: str) -> bool:
  """Whether `path` is a Hugging Face checkpoint directory (config.json with a model_type, safetensors)."""
  if not os.path.isdir(path) or not os.path.exists(os.path.join(path, CONFIG)):
    return False
  if not any(os.path.exists(os.path.join(path, f)) for f in (WEIGHTS, INDEX)):
    return False
  try:
    hf = _read_config(path)
  except HFError:
    return False
  return "model_type" in hf or "architectures" in hf


def family_of(hf: dict, where: str = CONFIG) -> str:
  """'gpt2' or 'llama' from config.json's model_type / architectures; anything else is refused."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  for family, arch in ARCHITECTURES.items():
    if model_type == family or arch in archs:
      return family
  raise HFError(
    f"{where}: model_type {model_type!r} (architectures {archs}) is not supported; "
    "llm_jax reads GPT2LMHeadModel (gpt2) and LlamaForCausalLM (llama) checkpoints"
  )


def _need(hf: dict, key: str, where: str):
  if hf.get(key) is None:
    raise HFError(f"{where}: key {key!r} is missing")
  return hf[key]


def _rope_settings(hf: dict, where: str) -> dict[str, Any]:
  """ModelConfig rope fields from rope_parameters (transformers 5) or rope_theta + rope_scaling (4.x)."""
  rope = dict(hf.get("rope_parameters") or {})
  if not rope:
    rope = dict(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
  if kind == "default":
    return out
  if kind not in ("linear", "llama3"):
    raise HFError(f"{where}: rope scaling type {kind!r} is not supported (default, linear, llama3)")
  out.update(rope_scaling=kind, rope_scaling_factor=float(_need(rope, "factor", f"{where} rope")))
  if kind == "llama3":
    out.update(
      rope_low_freq_factor=float(_need(rope, "low_freq_factor", f"{where} rope")),
      rope_high_freq_factor=float(_need(rope, "high_freq_factor", f"{where} rope")),
      rope_original_max_len=int(_need(rope, "original_max_position_embeddings", f"{where} rope")),
    )
  return out


def model_config_from_hf(hf: dict, where: str = CONFIG) -> ModelConfig:
  """The ModelConfig (float32, scanned layers) of a config.json; refuses settings the Decoder lacks."""
  family = family_of(hf, where)
  if family == GPT2:
    d, n = int(_need(hf, "n_embd", where)), int(_need(hf, "n_head", where))
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
      raise HFError(
        f"{where}: activation_function {act!r} is not supported (the Decoder's GELU is the "
        f"tanh approximation: {', '.join(_GELU_TANH)})"
      )
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
      raise HFError(f"{where}: scale_attn_by_inverse_layer_idx / scale_attn_weights=false are not supported")
    return ModelConfig(
      vocab_size=int(_need(hf, "vocab_size", where)),
      num_layers=int(_need(hf, "n_layer", where)),
      d_model=d,
      num_heads=n,
      num_kv_heads=n,
      head_dim=d // n,
      mlp_dim=int(hf.get("n_inner") or 4 * d),
      max_seq_len=int(_need(hf, "n_positions", where)),
      positions="learned",
      norm="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      activation="gelu",
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      use_bias=True,
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise HFError(f"{where}: hidden_act {act!r} is not supported (LLaMA's SwiGLU uses silu)")
  bias = bool(hf.get("attention_bias", False))
  if bool(hf.get("mlp_bias", False)) != bias:
    raise HFError(
      f"{where}: attention_bias={bias} with mlp_bias={hf.get('mlp_bias')} is not "
      "supported (the Decoder has one use_bias for both)"
    )
  d, n = int(_need(hf, "hidden_size", where)), int(_need(hf, "num_attention_heads", where))
  return ModelConfig(
    vocab_size=int(_need(hf, "vocab_size", where)),
    num_layers=int(_need(hf, "num_hidden_layers", where)),
    d_model=d,
    num_heads=n,
    num_kv_heads=int(hf.get("num_key_value_heads") or n),
    head_dim=int(hf.get("head_dim") or d // n),
    mlp_dim=int(_need(hf, "intermediate_size", where)),
    max_seq_len=int(_need(hf, "max_position_embeddings", where)),
    positions="rope",
    norm="rmsnorm",
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    activation="swiglu",
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    use_bias=bias,
    **_rope_settings(hf, where),
  )


def weight_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory (the index's shards, or model.safetensors)."""
  index = os.path.join(path, INDEX)
  if os.path.exists(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise HFError(f"cannot read the weight_map of {index}: {e}") from e
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(path, WEIGHTS)):
    files = [WEIGHTS]
  else:
    raise HFError(f"{path} has neither {WEIGHTS} nor {INDEX}")
  missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise HFError(f"{path}: weight files {missing} named by {INDEX} are missing")
  return [os.path.join(path, f) for f in files]


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's safetensors files as float32 numpy arrays (bf16/fp16 upcast)."""
  out = {}
  with jax.default_device(jax.devices("cpu")[0]):  # bfloat16 goes through jax; keep it on the host
    for file in weight_files(path):
      with safe_open(file, framework="flax") as f:
        for name in f.keys():  # safe_open is no dict: keys() is its API
          out[name] = np.asarray(jax.device_get(f.get_tensor(name))).astype(np.float32)
  return out


def _special_ids(hf: dict, where: str, vocab: int) -> dict[str, int]:
  """config.json's bos/eos/pad_token_id (a list's first id); a negative one is none (old LLaMA
  configs write pad_token_id -1)."""
  out = {}
  for name in ("bos", "eos", "pad"):
    ids = _token_ids(hf.get(f"{name}_token_id"), where, f"{name}_token_id", vocab, negative_is_none=True)
    if ids:
      out[name] = ids[0]
  return out


def _token_ids(value, where: str, key: str, vocab: int, negative_is_none: bool = False) -> list[int]:
  """The token ids of a config key (an id, a list of ids, or null); anything else, or an id outside
  [0, vocab), is an error naming the file and the key."""
  values = value if isinstance(value, list) else ([] if value is None else [value])
  out = []
  for v in values:
    if not isinstance(v, int) or isinstance(v, bool):
      raise HFError(f"{where}: {key} holds {v!r}, not a token id")
    if v < 0 and negative_is_none:
      continue
    if not 0 <= v < vocab:
      raise HFError(f"{where}: {key} {v} is outside the vocabulary's {vocab} ids")
    out.append(v)
  return out


def read_hf(path: str, require_tokenizer: bool = True):
  """(params, ModelConfig, tokenizer, provenance) of a Hugging Face checkpoint directory.

  params are float32 numpy arrays in the Decoder's scanned layout. The tokenizer is None only when
  the directory has none and require_tokenizer is False.
  """
  cfg, tokenizer, provenance = describe_hf(path, require_tokenizer)
  tensors = read_tensors(path)
  try:
    params = hf_names.params_from_hf(tensors, cfg, provenance["model_type"], path)
  except ValueError as e:
    raise HFError(str(e)) from e
  logging.info(
    "read Hugging Face %s checkpoint %s: %d layers, d_model %d, vocab %d",
    provenance["architecture"],
    path,
    cfg.num_layers,
    cfg.d_model,
    cfg.vocab_size,
  )
  return params, cfg, tokenizer, provenance


def describe_hf(path: str, require_tokenizer: bool = True):
  """(ModelConfig, tokenizer, provenance) of a checkpoint directory, without reading its weights."""
  if not os.path.isdir(path):
    raise HFError(f"{path} is not a directory")
  hf = _read_config(path)
  where = os.path.join(path, CONFIG)
  cfg = model_config_from_hf(hf, where)
  files = weight_files(path)
  tokenizer = None
  if any(
    os.path.exists(os.path.join(path, f)) for f in (hf_tokenizer.TOKENIZER_JSON, hf_tokenizer.TOKENIZER_MODEL)
  ):
    tokenizer = hf_tokenizer.load_tokenizer(path, special_ids=_special_ids(hf, where, cfg.vocab_size))
  elif require_tokenizer:
    raise HFError(
      f"{path} has no tokenizer ({hf_tokenizer.TOKENIZER_JSON} or {hf_tokenizer.TOKENIZER_MODEL})"
    )
  with open(where, "rb") as f:
    config_sha = hashlib.sha256(f.read()).hexdigest()
  family = family_of(hf, where)
  provenance = {
    "source": os.path.abspath(path),
    "format": "huggingface",
    "architecture": ARCHITECTURES[family],
    "model_type": family,  # the family: gpt2 | llama
    "transformers_version": hf.get("transformers_version", ""),
    "stored_dtype": hf.get("dtype") or hf.get("torch_dtype") or "",
    "config_sha256": config_sha,
    "weight_files": {os.path.basename(f): os.path.getsize(f) for f in files},
    "tokenizer_sha256": tokenizer.sha256 if tokenizer is not None else "",
    "prompt_prefix": hf_tokenizer.prompt_prefix(tokenizer) if tokenizer is not None else [],
    "eos_token_ids": _eos_ids(hf, path, tokenizer.vocab_size if tokenizer is not None else cfg.vocab_size),
  }
  return cfg, tokenizer, provenance


def _eos_ids(hf: dict, path: str, vocab: int) -> list[int]:
  """End-of-text ids: config.json's eos_token_id (an id or a list), then generation_config.json's
  (where LLaMA-3 instruct lists its end-of-turn <|eot_id|>), each once; ids below the tokenizer's
  `vocab` (an entry that is no id, or outside it, is an error naming the file)."""
  gen_file = os.path.join(path, GENERATION_CONFIG)
  gen = _read_config(path, GENERATION_CONFIG) if os.path.exists(gen_file) else {}
  out: list[int] = []
  for file, value in (
    (os.path.join(path, CONFIG), hf.get("eos_token_id")),
    (gen_file, gen.get("eos_token_id")),
  ):
    out += [v for v in _token_ids(value, file, "eos_token_id", vocab, negative_is_none=True) if v not in out]
  return out
