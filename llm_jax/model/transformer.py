"""A decoder-only transformer covering GPT-2 and LLaMA, with logical axis names on every parameter.

`cfg.causal=False` makes the same blocks a bidirectional encoder (BERT-style; llm_jax.encoder): attention
without the causal mask, and no KV-cache decoding.

Shapes in names: B batch, L length (queries), S cache length (keys), D d_model, N query heads,
K kv heads, H head dim, F mlp dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.model.activations import gelu_tanh, swiglu
from llm_jax.model.config import ModelConfig
from llm_jax.model.fused import KVCache, fused_dense, fused_params, norm_stats, one_cache_attention
from llm_jax.model.gelu_kernel import gelu_dot_general
from llm_jax.model.layers import Norm, head_logits
from llm_jax.model.partitioning import constrain as _constrain
from llm_jax.model.partitioning import gathering_dot as _gathering_dot
from llm_jax.model.rope import rope, rope_scaled_frequencies

Array = Any
_lp = nn.with_logical_partitioning


def _dtype(name: str):
  return jnp.dtype(name)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention (causal unless cfg.causal=False), with a KV cache for
  decoding (causal models only).

  `decode_span` (decoding only; 0 = max_seq_len): attend to the first decode_span cache positions.
  The caller guarantees every position in the call is below it (generate picks a bucket).
  """

  cfg: ModelConfig
  decode_span: int = 0

  @nn.compact
  def __call__(
    self,
    x_BLD,
    positions_BL,
    segment_ids_BL=None,
    decode: bool = False,
    deterministic: bool = True,
    layer=None,
    stats=None,
    kv=None,
  ):
    """`stats` (decode lever "norm"): x is the block input and its norm is folded into the fused
    projection. `kv` (decode lever "kv"): this layer's [2, B, K, S, H] of the one cache; the call then
    returns (output, (keys, values)) and the caller writes them (Decoder.hidden)."""
    c = self.cfg
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    out_std = c.init_std / math.sqrt(2 * c.num_layers)
    levers = c.levers() if decode else frozenset()

    def proj(name, heads, axes):
      return nn.DenseGeneral(
        (heads, c.head_dim),
        use_bias=c.use_bias,
        dtype=dt,
        param_dtype=pdt,
        dot_general=_gathering_dot(("embed",) + axes),
        kernel_init=_lp(_normal(c.init_std), ("embed",) + axes),
        bias_init=_lp(nn.initializers.zeros, axes),
        name=name,
      )(x_BLD)

    if "qkv" in levers:  # one matmul for queries, keys and values (model.levers.fuse_qkv)
      n, kh = c.num_heads, c.num_kv_heads
      kernel, bias, colsum = fused_params(self, "qkv", (n + 2 * kh, c.head_dim), c, stats is not None)
      qkv_BLAH = fused_dense(x_BLD, kernel, bias, dt, stats, colsum)
      q_BLNH, k_BLKH, v_BLKH = jnp.split(qkv_BLAH, [n, n + kh], axis=2)
    else:
      q_BLNH = proj("query", c.num_heads, ("heads", "kv"))
      k_BLKH = proj("key", c.num_kv_heads, ("kv_heads", "kv"))
      v_BLKH = proj("value", c.num_kv_heads, ("kv_heads", "kv"))
    if c.positions == "rope":
      freq_h = rope_scaled_frequencies(c)
      q_BLNH = rope(q_BLNH, positions_BL, c.rope_theta, freq_h)
      k_BLKH = rope(k_BLKH, positions_BL, c.rope_theta, freq_h)
    q_BLNH = _constrain(q_BLNH, ("batch", "length", "act_heads", None))
    k_BLKH = _constrain(k_BLKH, ("batch", "length", "act_kv_heads", None))
    v_BLKH = _constrain(v_BLKH, ("batch", "length", "act_kv_heads", None))

    if decode and not c.causal:
      raise ValueError("model.causal=False (an encoder) has no KV-cache decoding")
    new_kv = None
    if decode and "kv" in levers:
      span = min(self.decode_span or c.max_seq_len, c.max_seq_len)
      out_BLNH = one_cache_attention(q_BLNH, k_BLKH, v_BLKH, positions_BL, kv, c, span)
      new_kv = (k_BLKH, v_BLKH)
    elif decode:
      out_BLNH = self._cached_attention(q_BLNH, k_BLKH, v_BLKH, positions_BL, layer)
    elif c.attention_dropout > 0 and not deterministic:
      out_BLNH = self._dropout_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
    elif segment_ids_BL is not None:
      same_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
      out_BLNH = jax.nn.dot_product_attention(
        q_BLNH, k_BLKH, v_BLKH, mask=same_B1LL, is_causal=c.causal, implementation="xla"
      )
    else:
      out_BLNH = jax.nn.dot_product_attention(
        q_BLNH, k_BLKH, v_BLKH, is_causal=c.causal, implementation=c.attention
      )
    out_BLNH = _constrain(out_BLNH, ("batch", "length", "act_heads", None))
    out_BLD = nn.DenseGeneral(
      c.d_model,
      axis=(-2, -1),
      use_bias=c.use_bias,
      dtype=dt,
      param_dtype=pdt,
      dot_general=_gathering_dot(("heads", "kv", "embed")),
      kernel_init=_lp(_normal(out_std), ("heads", "kv", "embed")),
      bias_init=_lp(nn.initializers.zeros, ("embed",)),
      name="out",
    )(out_BLNH)
    return out_BLD if new_kv is None else (out_BLD, new_kv)

  def _dropout_attention(self, q_BLNH, k_BLKH, v_BLKH, segment_ids_BL):
    """Attention with dropout on the probabilities (training only; XLA, not fused)."""
    c = self.cfg
    b, length, n, h = q_BLNH.shape
    q_BLKGH = q_BLNH.reshape(b, length, c.num_kv_heads, n // c.num_kv_heads, h)
    s_BKGLS = jnp.einsum(
      "blkgh,bskh->bkgls", q_BLKGH, k_BLKH, preferred_element_type=jnp.float32
    ) / math.sqrt(h)
    mask_BKGLS = jnp.ones((length, length), bool)
    mask_BKGLS = (jnp.tril(mask_BKGLS) if c.causal else mask_BKGLS)[None, None, None]
    if segment_ids_BL is not None:
      mask_BKGLS = mask_BKGLS & (
        segment_ids_BL[:, None, None, :, None] == segment_ids_BL[:, None, None, None, :]
      )
    s_BKGLS = jnp.where(mask_BKGLS, s_BKGLS, jnp.finfo(jnp.float32).min)
    p_BKGLS = nn.Dropout(c.attention_dropout)(jax.nn.softmax(s_BKGLS, axis=-1), deterministic=False)
    out_BLKGH = jnp.einsum("bkgls,bskh->blkgh", p_BKGLS.astype(v_BLKH.dtype), v_BLKH)
    return out_BLKGH.reshape(b, length, n, h)

  def _cached_attention(self, q_BLNH, k_BLKH, v_BLKH, positions_BL, layer=None):
    """Writes this call's keys/values at each row's positions, then attends to positions <= own.

    The cache is [B, K, S, H] (heads before positions): both attention matmuls then read it in
    place, without a transposed copy of the whole cache per layer and step. Under scanned layers
    (`layer` given) the cache is the stacked [layers, B, K, S, H] one, written in place at this
    layer (no per-layer slice copied in and stacked back out). The arithmetic is
    jax.nn.dot_product_attention's (implementation "xla"): float32 scores and softmax.
    """
    c = self.cfg
    b, length, n, h = q_BLNH.shape
    kh = c.num_kv_heads
    is_init = not self.has_variable("cache", "cached_key")
    shape = (b, kh, c.max_seq_len, c.head_dim)
    k_cache = self.variable("cache", "cached_key", jnp.zeros, shape, k_BLKH.dtype)
    v_cache = self.variable("cache", "cached_value", jnp.zeros, shape, v_BLKH.dtype)
    if is_init:  # init only allocates the cache
      return jnp.zeros_like(q_BLNH)
    start_B = positions_BL[:, 0]
    rows_BL = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
    pos_BL = start_B[:, None] + jnp.arange(length)[None, :]

    def write(cache, new_BLKH):  # one scatter of [B, L] (row, position) slots, each [K, H]
      new_BLKH = new_BLKH.astype(cache.dtype)
      if layer is None:
        return cache.at[rows_BL, :, pos_BL, :].set(new_BLKH)
      return cache.at[layer, rows_BL, :, pos_BL, :].set(new_BLKH)

    k_cache.value = write(k_cache.value, k_BLKH)
    v_cache.value = write(v_cache.value, v_BLKH)
    k_BKSH, v_BKSH = k_cache.value, v_cache.value
    if layer is not None:
      k_BKSH, v_BKSH = k_BKSH[layer], v_BKSH[layer]
    span = min(self.decode_span or c.max_seq_len, c.max_seq_len)
    if span < c.max_seq_len:  # positions past the span are not filled yet: leave them unread
      k_BKSH, v_BKSH = k_BKSH[:, :, :span], v_BKSH[:, :, :span]
    q_BKGLH = q_BLNH.reshape(b, length, kh, n // kh, h).transpose(0, 2, 3, 1, 4)
    precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q_BLNH.dtype == jnp.bfloat16 else None
    s_BKGLS = jnp.einsum(
      "bkglh,bksh->bkgls", q_BKGLH, k_BKSH, precision=precision, preferred_element_type=jnp.float32
    )
    s_BKGLS = s_BKGLS * jnp.array(1.0 / math.sqrt(h), jnp.float32)
    key_pos_S = jnp.arange(span)
    mask_B11LS = key_pos_S[None, None, None, None, :] <= positions_BL[:, None, None, :, None]
    s_BKGLS = jnp.where(mask_B11LS, s_BKGLS, -0.7 * float(jnp.finfo(jnp.float32).max))
    p_BKGLS = jax.nn.softmax(s_BKGLS, axis=-1).astype(k_BKSH.dtype)
    out_BKGLH = jnp.einsum("bkgls,bksh->bkglh", p_BKGLS, v_BKSH)
    return out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)


class Mlp(nn.Module):
  """GELU MLP (GPT-2) or SwiGLU (LLaMA); `fp8`: its matmuls in FP8 (llm_jax.model.fp8)."""

  cfg: ModelConfig
  fp8: bool = False

  @nn.compact
  def __call__(self, x_BLD, decode: bool = False, stats=None):
    """`decode` applies the decode levers: with "qkv" SwiGLU's gate and up are one [D, 2, F] matmul,
    with "norm" (`stats` of x given) the norm is folded into that first matmul ("in_*" parameters)."""
    c = self.cfg
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    out_std = c.init_std / math.sqrt(2 * c.num_layers)
    levers = c.levers() if decode else frozenset()

    def dense(name, feat, axes, std, dot=None):
      return nn.Dense(
        feat,
        use_bias=c.use_bias,
        dtype=dt,
        param_dtype=pdt,
        name=name,
        dot_general=dot or _gathering_dot(axes, fp8=self.fp8),
        kernel_init=_lp(_normal(std), axes),
        bias_init=_lp(nn.initializers.zeros, axes[1:]),
      )

    # The activations carry custom gradients: autodiff would also keep tanh/sigmoid outputs
    # [B, L, F] for the backward pass, one more write and read of the MLP's largest tensor.
    swi = c.activation == "swiglu"
    if "norm" in levers or (swi and "qkv" in levers):  # model.levers: fuse_qkv, fold_norm
      shape = (2, c.mlp_dim) if swi else (c.mlp_dim,)
      kernel, bias, colsum = fused_params(self, "in", shape, c, stats is not None)
      h = fused_dense(x_BLD, kernel, bias, dt, stats, colsum)
      h_BLF = swiglu(h[:, :, 0], h[:, :, 1]) if swi else gelu_tanh(h)
    elif c.activation == "swiglu":
      h_BLF = swiglu(
        dense("gate", c.mlp_dim, ("embed", "mlp"), c.init_std)(x_BLD),
        dense("up", c.mlp_dim, ("embed", "mlp"), c.init_std)(x_BLD),
      )
    elif c.gelu_kernel == "mosaic" and not decode and not self.fp8:
      # model.gelu_kernel: the down projection takes the pre-activation; its backward pass computes
      # (dY @ W^T) * gelu'(h) in one kernel (llm_jax.model.gelu_kernel). Same parameters.
      h_BLF = _constrain(
        dense("up", c.mlp_dim, ("embed", "mlp"), c.init_std)(x_BLD), ("batch", "length", "act_mlp")
      )
      return dense(
        "down", c.d_model, ("mlp", "embed"), out_std, dot=gelu_dot_general(("mlp", "embed"), True)
      )(h_BLF)
    else:
      h_BLF = gelu_tanh(dense("up", c.mlp_dim, ("embed", "mlp"), c.init_std)(x_BLD))
    h_BLF = _constrain(h_BLF, ("batch", "length", "act_mlp"))
    return dense("down", c.d_model, ("mlp", "embed"), out_std)(h_BLF)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  cfg: ModelConfig
  decode: bool = False
  decode_span: int = 0

  @nn.compact
  def __call__(self, x_BLD, positions_BL, segment_ids_BL, deterministic: bool):
    c = self.cfg
    layer = None
    if isinstance(x_BLD, tuple):  # decoding under nn.scan: carry (x, layer index), stacked cache
      x_BLD, layer = x_BLD
    kv = None
    if isinstance(x_BLD, dict):  # decode lever "kv": {"x": x, "kv": this layer's [2, B, K, S, H]}
      x_BLD, kv = x_BLD["x"], x_BLD["kv"]
    levers = c.levers() if self.decode else frozenset()
    drop = nn.Dropout(c.dropout)
    if "norm" in levers:  # folded into the next matmuls: only the statistics are computed here
      attn_in, attn_stats = x_BLD, norm_stats(x_BLD, c)
    else:
      attn_in, attn_stats = Norm(c, name="norm_attn")(x_BLD), None
    h = Attention(c, decode_span=self.decode_span, name="attn")(
      attn_in,
      positions_BL,
      segment_ids_BL,
      decode=self.decode,
      deterministic=deterministic,
      layer=layer,
      stats=attn_stats,
      kv=kv,
    )
    new_kv = None
    if "kv" in levers:
      h, new_kv = h
    x_BLD = x_BLD + drop(h, deterministic=deterministic)
    # FP8 (model.fp8) in training and full-sequence passes; KV-cache decoding stays in the compute dtype
    mlp = Mlp(c, fp8=c.fp8 and not self.decode, name="mlp")
    if "norm" in levers:
      h = mlp(x_BLD, decode=True, stats=norm_stats(x_BLD, c))
    else:
      h = mlp(Norm(c, name="norm_mlp")(x_BLD), decode=self.decode)
    x_BLD = x_BLD + drop(h, deterministic=deterministic)
    x_BLD = _constrain(x_BLD, ("batch", "length", "act_embed"))
    if new_kv is not None:
      return x_BLD, new_kv
    if layer is not None:
      return (x_BLD, layer + 1), None
    if self.cfg.scan_layers:
      return x_BLD, None
    return x_BLD


_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nn.Module):
  """Token ids [B, L] -> float32 logits [B, L, V]. `decode=True` uses and fills the KV cache;
  `decode_span` > 0 then attends to that many cache positions only (see Attention)."""

  cfg: ModelConfig
  decode: bool = False
  decode_span: int = 0

  def setup(self):
    c = self.cfg
    pdt = _dtype(c.param_dtype)
    self.embedding = self.param(
      "embedding", _lp(_normal(c.init_std), ("vocab", "embed")), (c.vocab_size, c.d_model), pdt
    )
    if c.positions == "learned":
      self.pos_embedding = self.param(
        "pos_embedding", _lp(_normal(c.init_std / 2), (None, "embed")), (c.max_seq_len, c.d_model), pdt
      )
    levers = c.levers() if self.decode else frozenset()
    if levers and c.scan_layers:
      raise ValueError("decode_levers need per-layer parameters (model.unstack_layers(levers=...))")
    if "kv" in levers:
      self.kv_cache = KVCache(c)
    block = Block
    if c.remat != "none":
      block = nn.remat(
        block, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers, static_argnums=(4,)
      )
    if c.scan_layers:
      # Decoding (after init) carries the whole stacked cache through the layers, each writing
      # its own slot in place; init still stacks the per-layer caches ([layers, B, K, S, H]).
      if self.decode and not self.is_initializing():
        axes = dict(variable_axes={"params": 0}, variable_carry="cache")
      else:
        axes = dict(variable_axes={"params": 0, "cache": 0})
      self.blocks = nn.scan(
        block,
        **axes,
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_layers,
        unroll=c.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, decode=self.decode, decode_span=self.decode_span, name="blocks")
    else:
      self.blocks = [
        block(c, decode=self.decode, decode_span=self.decode_span, name=f"block_{i}")
        for i in range(c.num_layers)
      ]
    self.final_norm = Norm(c)
    if not c.tie_embeddings:
      self.head = self.param(
        "head", _lp(_normal(c.init_std), ("embed", "vocab")), (c.d_model, c.vocab_size), pdt
      )
    self.drop = nn.Dropout(c.dropout)

  def hidden(self, tokens_BL, positions_BL=None, segment_ids_BL=None, deterministic: bool = True):
    """Token ids -> final normed hidden states [B, L, D] in the compute dtype."""
    c = self.cfg
    dt = _dtype(c.dtype)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    x_BLD = jnp.take(self.embedding, tokens_BL, axis=0).astype(dt)
    if c.positions == "learned":
      x_BLD = x_BLD + jnp.take(self.pos_embedding, positions_BL, axis=0).astype(dt)
    x_BLD = self.drop(x_BLD, deterministic=deterministic)
    x_BLD = _constrain(x_BLD, ("batch", "length", "act_embed"))
    if self.decode and "kv" in c.levers():
      b = tokens_BL.shape[0]
      cache = self.kv_cache(b)
      new = []
      for i, blk in enumerate(self.blocks):
        layer_in = {"x": x_BLD, "kv": cache[i]}
        x_BLD, (k_BLKH, v_BLKH) = blk(layer_in, positions_BL, segment_ids_BL, deterministic)
        new.append(jnp.stack([k_BLKH, v_BLKH], axis=2))
      self.kv_cache(b, jnp.stack(new, axis=2), positions_BL)
    elif c.scan_layers and self.decode and not self.is_initializing():
      (x_BLD, _), _ = self.blocks((x_BLD, jnp.int32(0)), positions_BL, segment_ids_BL, deterministic)
    elif c.scan_layers:
      x_BLD, _ = self.blocks(x_BLD, positions_BL, segment_ids_BL, deterministic)
    else:
      for blk in self.blocks:
        x_BLD = blk(x_BLD, positions_BL, segment_ids_BL, deterministic)
    return self.final_norm(x_BLD)

  def head_matrix(self):
    """The output projection [D, V] (the embedding transposed when tied)."""
    return self.embedding.T if self.cfg.tie_embeddings else self.head

  def logits(self, h_BLD, keep_dtype: bool = False):
    """Hidden states -> float32 logits (keep_dtype: in cfg.logits_dtype, as the loss takes them).

    The matmul runs in the compute dtype with float32 accumulation and writes cfg.logits_dtype.
    """
    fp8 = self.cfg.fp8 and self.cfg.fp8_head and not self.decode
    logits_BLV = head_logits(h_BLD, self.head_matrix(), self.cfg, fp8=fp8)
    return logits_BLV if keep_dtype else logits_BLV.astype(jnp.float32)

  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, deterministic: bool = True):
    return self.logits(self.hidden(tokens_BL, positions_BL, segment_ids_BL, deterministic))
