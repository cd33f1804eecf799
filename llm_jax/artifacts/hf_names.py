"""Tensor names and layouts: Hugging Face GPT-2 / LLaMA state dicts <-> the Decoder's scanned parameters.

Hugging Face stores nn.Linear weights as [out, in] (LLaMA) and GPT-2's Conv1D weights as [in, out];
the Decoder keeps [in, ...out] kernels with heads split out ([D, N, H] for a query projection). Every
conversion is a transpose and a reshape, so both directions are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llm_jax.model import ModelConfig

_GPT2_PREFIXES = ("transformer.", "")  # GPT2LMHeadModel, or a bare GPT2Model state dict
_LLAMA_PREFIXES = ("model.", "")


class MissingTensor(KeyError):
  """A tensor the architecture needs is not in the checkpoint."""


def _getter(tensors: dict[str, np.ndarray], prefixes: tuple[str, ...], where: str) -> Callable:
  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    for p in prefixes:
      if p + name in tensors:
        x = tensors[p + name]
        if tuple(x.shape) != tuple(shape):
          raise ValueError(
            f"{where}: tensor {p + name} has shape {tuple(x.shape)}, config.json implies {tuple(shape)}"
          )
        return x
    raise MissingTensor(f"{where}: tensor {prefixes[0] + name} is missing")

  return get


def _norm(name: str, scale, bias=None) -> dict:
  sub = {"scale": scale} if bias is None else {"scale": scale, "bias": bias}
  return {name: sub}


def _stack(layers: list[dict]) -> dict:
  """Per-layer nested dicts -> one dict of arrays with a leading layer axis."""
  first = layers[0]
  if isinstance(first, dict):
    return {k: _stack([layer[k] for layer in layers]) for k in first}
  return np.stack(layers)


def _layer(tree: dict, i: int) -> dict:
  return {k: _layer(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def _gpt2_layer(get, c: ModelConfig, i: int) -> dict:
  d, n, h, f = c.d_model, c.num_heads, c.head_dim, c.mlp_dim
  p = f"h.{i}."
  qkv_w = get(p + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
  qkv_b = get(p + "attn.c_attn.bias", (3 * d,))
  attn = {}
  for j, name in enumerate(("query", "key", "value")):
    attn[name] = {
      "kernel": qkv_w[:, j * d : (j + 1) * d].reshape(d, n, h),
      "bias": qkv_b[j * d : (j + 1) * d].reshape(n, h),
    }
  attn["out"] = {
    "kernel": get(p + "attn.c_proj.weight", (d, d)).reshape(n, h, d),
    "bias": get(p + "attn.c_proj.bias", (d,)),
  }
  mlp = {
    "up": {"kernel": get(p + "mlp.c_fc.weight", (d, f)), "bias": get(p + "mlp.c_fc.bias", (f,))},
    "down": {"kernel": get(p + "mlp.c_proj.weight", (f, d)), "bias": get(p + "mlp.c_proj.bias", (d,))},
  }
  return {
    "attn": attn,
    "mlp": mlp,
    "norm_attn": _norm("LayerNorm_0", get(p + "ln_1.weight", (d,)), get(p + "ln_1.bias", (d,))),
    "norm_mlp": _norm("LayerNorm_0", get(p + "ln_2.weight", (d,)), get(p + "ln_2.bias", (d,))),
  }


def _llama_layer(get, c: ModelConfig, i: int) -> dict:
  d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  p = f"layers.{i}."
  attn = {}
  for name, hf_name, heads in (("query", "q_proj", n), ("key", "k_proj", k), ("value", "v_proj", k)):
    attn[name] = {"kernel": get(p + f"self_attn.{hf_name}.weight", (heads * h, d)).T.reshape(d, heads, h)}
    if c.use_bias:
      attn[name]["bias"] = get(p + f"self_attn.{hf_name}.bias", (heads * h,)).reshape(heads, h)
  attn["out"] = {"kernel": get(p + "self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d)}
  if c.use_bias:
    attn["out"]["bias"] = get(p + "self_attn.o_proj.bias", (d,))
  mlp = {}
  for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
    mlp[name] = {"kernel": get(p + f"mlp.{name}_proj.weight", shape).T}
    if c.use_bias:
      mlp[name]["bias"] = get(p + f"mlp.{name}_proj.bias", shape[:1])
  return {
    "attn": attn,
    "mlp": mlp,
    "norm_attn": _norm("RMSNorm_0", get(p + "input_layernorm.weight", (d,))),
    "norm_mlp": _norm("RMSNorm_0", get(p + "post_attention_layernorm.weight", (d,))),
  }


def params_from_hf(tensors: dict[str, np.ndarray], c: ModelConfig, family: str, where: str) -> dict:
  """The Decoder's scanned parameter tree from a Hugging Face state dict (float32 numpy)."""
  gpt2 = family == "gpt2"
  get = _getter(tensors, _GPT2_PREFIXES if gpt2 else _LLAMA_PREFIXES, where)
  head_get = _getter(tensors, ("",), where)
  v, d = c.vocab_size, c.d_model
  layer = _gpt2_layer if gpt2 else _llama_layer
  try:
    params = {
      "embedding": get("wte.weight" if gpt2 else "embed_tokens.weight", (v, d)),
      "blocks": _stack([layer(get, c, i) for i in range(c.num_layers)]),
    }
    if gpt2:
      params["pos_embedding"] = get("wpe.weight", (c.max_seq_len, d))
      params["final_norm"] = _norm("LayerNorm_0", get("ln_f.weight", (d,)), get("ln_f.bias", (d,)))
    else:
      params["final_norm"] = _norm("RMSNorm_0", get("norm.weight", (d,)))
    if not c.tie_embeddings:
      params["head"] = head_get("lm_head.weight", (v, d)).T
  except MissingTensor as e:
    raise ValueError(str(e.args[0])) from e
  return _contiguous(params)


def _contiguous(tree):
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)


def _gpt2_tensors(blk: dict, c: ModelConfig, i: int) -> dict[str, np.ndarray]:
  d = c.d_model
  a, m = blk["attn"], blk["mlp"]
  p = f"transformer.h.{i}."
  return {
    p + "attn.c_attn.weight": np.concatenate(
      [a[n]["kernel"].reshape(d, d) for n in ("query", "key", "value")], axis=1
    ),
    p + "attn.c_attn.bias": np.concatenate([a[n]["bias"].reshape(d) for n in ("query", "key", "value")]),
    p + "attn.c_proj.weight": a["out"]["kernel"].reshape(d, d),
    p + "attn.c_proj.bias": a["out"]["bias"],
    p + "mlp.c_fc.weight": m["up"]["kernel"],
    p + "mlp.c_fc.bias": m["up"]["bias"],
    p + "mlp.c_proj.weight": m["down"]["kernel"],
    p + "mlp.c_proj.bias": m["down"]["bias"],
    p + "ln_1.weight": blk["norm_attn"]["LayerNorm_0"]["scale"],
    p + "ln_1.bias": blk["norm_attn"]["LayerNorm_0"]["bias"],
    p + "ln_2.weight": blk["norm_mlp"]["LayerNorm_0"]["scale"],
    p + "ln_2.bias": blk["norm_mlp"]["LayerNorm_0"]["bias"],
  }


def _llama_tensors(blk: dict, c: ModelConfig, i: int) -> dict[str, np.ndarray]:
  d = c.d_model
  a, m = blk["attn"], blk["mlp"]
  p = f"model.layers.{i}."
  out = {}
  for name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    out[p + f"self_attn.{hf_name}.weight"] = a[name]["kernel"].reshape(d, -1).T
    if c.use_bias:
      out[p + f"self_attn.{hf_name}.bias"] = a[name]["bias"].reshape(-1)
  out[p + "self_attn.o_proj.weight"] = a["out"]["kernel"].reshape(-1, d).T
  if c.use_bias:
    out[p + "self_attn.o_proj.bias"] = a["out"]["bias"]
  for name in ("gate", "up", "down"):
    out[p + f"mlp.{name}_proj.weight"] = m[name]["kernel"].T
    if c.use_bias:
      out[p + f"mlp.{name}_proj.bias"] = m[name]["bias"]
  out[p + "input_layernorm.weight"] = blk["norm_attn"]["RMSNorm_0"]["scale"]
  out[p + "post_attention_layernorm.weight"] = blk["norm_mlp"]["RMSNorm_0"]["scale"]
  return out


def hf_from_params(params: dict, c: ModelConfig, family: str) -> dict[str, np.ndarray]:
  """A Hugging Face state dict (contiguous float32 numpy) from scanned float32 numpy parameters."""
  gpt2 = family == "gpt2"
  layer = _gpt2_tensors if gpt2 else _llama_tensors
  out = {}
  for i in range(c.num_layers):
    out.update(layer(_layer(params["blocks"], i), c, i))
  if gpt2:
    out["transformer.wte.weight"] = params["embedding"]
    out["transformer.wpe.weight"] = params["pos_embedding"]
    out["transformer.ln_f.weight"] = params["final_norm"]["LayerNorm_0"]["scale"]
    out["transformer.ln_f.bias"] = params["final_norm"]["LayerNorm_0"]["bias"]
  else:
    out["model.embed_tokens.weight"] = params["embedding"]
    out["model.norm.weight"] = params["final_norm"]["RMSNorm_0"]["scale"]
  if not c.tie_embeddings:
    out["lm_head.weight"] = params["head"].T
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
