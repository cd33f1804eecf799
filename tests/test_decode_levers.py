"""Decode levers (ModelConfig.decode_levers): the same greedy tokens and logits as today's decode path,
their parameter layout and errors, and fewer operations per compiled step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import generate as G
from llm_jax.eval import decode_kernels as K
from llm_jax.model import ModelConfig, stack_layers, unstack_layers
from llm_jax.model.params import init_params
from llm_jax.model.quantize import quantize_params

GPT = ModelConfig(
  vocab_size=300,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=4,
  head_dim=8,
  mlp_dim=64,
  max_seq_len=160,  # room for a decode span (MIN_SPAN) short of the cache
  init_std=0.3,
)
LLAMA = dataclasses.replace(
  GPT,
  positions="rope",
  norm="rmsnorm",
  activation="swiglu",
  use_bias=False,
  num_kv_heads=2,
  tie_embeddings=False,
)
PROMPTS = [[1, 5, 6, 7], [1, 9, 8, 7, 6, 5, 4, 3, 2, 11]]
STEPS = 20


def _params(cfg, dtype=jnp.float32):
  p = init_params(cfg, seed=1)
  # norms away from scale 1 / bias 0, so that folding them changes the matrices
  p = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), p)
  return jax.tree.map(lambda x: x.astype(dtype), p)


def _decode(params, cfg, levers=""):
  """(prefill logits, greedy tokens [B, STEPS], logits after the last step) with these levers."""
  p, c = unstack_layers(params, cfg, levers=levers)
  b = G.make_batch(PROMPTS, [G.SamplingParams(max_new_tokens=STEPS)] * len(PROMPTS), c)
  assert b.span == G.MIN_SPAN  # the span-limited read of the cache is exercised
  state = b.start(p, c)
  end, out = G.decode_loop(p, state, cfg=c, max_steps=b.max_steps, eos_id=-1, greedy=True, span=b.span)
  return np.asarray(state.logits_BV), np.asarray(out["token"])[:, :STEPS], np.asarray(end.logits_BV)


@pytest.fixture(scope="module")
def cases():
  out = {}
  for name, cfg in (("gpt", GPT), ("llama", LLAMA)):
    params = _params(cfg)
    out[name] = (params, cfg, _decode(params, cfg))
  return out


@pytest.mark.parametrize(
  "name,levers",
  [("gpt", "qkv"), ("gpt", "kv"), ("gpt", "qkv,norm,kv"), ("llama", "qkv,norm"), ("llama", "qkv,norm,kv")],
)
def test_levers_decode_as_today(cases, name, levers):
  params, cfg, (want_first, want_tokens, want_last) = cases[name]
  first, tokens, last = _decode(params, cfg, levers)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(first, want_first, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(last, want_last, atol=2e-5, rtol=1e-5)


def test_all_levers_in_bfloat16_within_bf16_tolerance():
  cfg = dataclasses.replace(GPT, dtype="bfloat16")
  params = _params(cfg, jnp.bfloat16)
  want_first, want_tokens, _ = _decode(params, cfg)
  first, tokens, _ = _decode(params, cfg, "qkv,norm,kv")
  np.testing.assert_allclose(first, want_first, atol=0.05 * np.abs(want_first).max())
  assert (tokens == want_tokens).mean() > 0.9  # a near-tie may flip one late token, not the run


def test_layout_state_and_errors(cases):
  params, cfg, _ = cases["gpt"]
  p, c = unstack_layers(params, cfg, levers="qkv,norm,kv")
  assert c.decode_levers == "qkv,norm,kv" and not c.scan_layers
  blk = p["block_0"]
  assert "norm_attn" not in blk and "norm_mlp" not in blk and "query" not in blk["attn"]
  assert blk["attn"]["qkv_kernel"].shape == (32, 4 + 2 * 4, 8)
  assert blk["mlp"]["in_colsum"].shape == (64,)
  # the serving slots' empty state has the cache the levers use: [layers, 2, B, K, S, H], batch at ndim-4
  empty = G.empty_state(c, 3)
  (kv,) = jax.tree.leaves(empty.cache)
  assert kv.shape == (2, 2, 3, 4, 160, 8)
  with pytest.raises(ValueError, match="unknown \\['fast'\\]"):
    unstack_layers(params, cfg, levers="qkv,fast")
  with pytest.raises(ValueError, match="needs 'qkv'"):
    unstack_layers(params, cfg, levers="norm")
  with pytest.raises(ValueError, match="already have decode_levers"):
    unstack_layers(p, c, levers="kv")
  with pytest.raises(ValueError, match="do not stack back"):
    stack_layers(p, c)
  q = jax.tree.map(jnp.asarray, quantize_params(jax.device_get(params)))
  with pytest.raises(ValueError, match="block_0/attn is int8"):
    unstack_layers(q, cfg, levers="qkv,norm")
  qp, qc = unstack_layers(q, cfg, levers="qkv")  # int8 weights concatenate (scales too)
  assert qp["block_0"]["attn"]["qkv_kernel"].q.dtype == jnp.int8


def test_fused_projections_compile_to_fewer_operations_per_step(cases):
  params, cfg, _ = cases["llama"]
  counts = {}
  for levers in ("", "qkv"):
    p, c = unstack_layers(params, cfg, levers=levers)
    counts[levers] = K.step_ops(p, c, batch=2, new_tokens=16)
  assert counts[""]["fusion"] > 0
  assert sum(counts["qkv"].values()) < sum(counts[""].values()), counts
