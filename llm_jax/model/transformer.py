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
from llm_jax.model.fp8 import fp8_dot_general
from llm_jax.model.partitioning import constrain as _constrain
from llm_jax.model.partitioning import gathering_dot as _gathering_dot
from llm_jax.model.rope import rope, rope_scaled_frequencies

Array = Any
_lp = nn.with_logical_partitioning


def _dtype(name: str):
  return jnp.dtype(name)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class Norm(nn.Module):
  """LayerNorm or RMSNorm, computed in float32, returned in the compute dtype."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    c = self.cfg
    kw = dict(
      epsilon=c.norm_eps,
      dtype=jnp.float32,
      param_dtype=_dtype(c.param_dtype),
      scale_init=_lp(nn.initializers.ones, ("norm",)),
    )
    if c.norm == "rmsnorm":
      y = nn.RMSNorm(**kw)(x_BLD.astype(jnp.float32))
    else:
      y = nn.LayerNorm(use_bias=c.use_bias, bias_init=_lp(nn.initializers.zeros, ("norm",)), **kw)(
        x_BLD.astype(jnp.float32)
      )
    return y.astype(_dtype(c.dtype))


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
  ):
    c = self.cfg
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    out_std = c.init_std / math.sqrt(2 * c.num_layers)

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
    if decode:
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
    return nn.DenseGeneral(
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
  def __call__(self, x_BLD):
    c = self.cfg
    dt, pdt = _dtype(c.dtype), _dtype(c.param_dtype)
    out_std = c.init_std / math.sqrt(2 * c.num_layers)

    def dense(name, feat, axes, std):
      return nn.Dense(
        feat,
        use_bias=c.use_bias,
        dtype=dt,
        param_dtype=pdt,
        name=name,
        dot_general=_gathering_dot(axes, fp8=self.fp8),
        kernel_init=_lp(_normal(std), axes),
        bias_init=_lp(nn.initializers.zeros, axes[1:]),
      )

    # The activations carry custom gradients: autodiff would also keep tanh/sigmoid outputs
    # [B, L, F] for the backward pass, one more write and read of the MLP's largest tensor.
    if c.activation == "swiglu":
      h_BLF = swiglu(
        dense("gate", c.mlp_dim, ("embed", "mlp"), c.init_std)(x_BLD),
        dense("up", c.mlp_dim, ("embed", "mlp"), c.init_std)(x_BLD),
      )
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
    drop = nn.Dropout(c.dropout)
    h = Attention(c, decode_span=self.decode_span, name="attn")(
      Norm(c, name="norm_attn")(x_BLD),
      positions_BL,
      segment_ids_BL,
      decode=self.decode,
      deterministic=deterministic,
      layer=layer,
    )
    x_BLD = x_BLD + drop(h, deterministic=deterministic)
    # FP8 (model.fp8) in training and full-sequence passes; KV-cache decoding stays in the compute dtype
    h = Mlp(c, fp8=c.fp8 and not self.decode, name="mlp")(Norm(c, name="norm_mlp")(x_BLD))
    x_BLD = x_BLD + drop(h, deterministic=deterministic)
    x_BLD = _constrain(x_BLD, ("batch", "length", "act_embed"))
    if layer is not None:
      return (x_BLD, layer + 1), None
    if self.cfg.scan_layers:
      return x_BLD, None
    return x_BLD


def head_logits(h_BLD, w_DV, cfg: ModelConfig, fp8: bool = False):
  """The output head: h [B, L, D] @ w [D, V] in the compute dtype, written in cfg.logits_dtype.

  Accumulates in float32; `fp8`: FP8 operands (llm_jax.model.fp8). The training loss's chunked path
  (train.loss_chunks) calls this on slices of h, so both paths compute the same logits.
  """
  w_DV = w_DV.astype(h_BLD.dtype)
  out_dtype = _dtype(cfg.logits_dtype)
  if fp8:
    dims = (((h_BLD.ndim - 1,), (0,)), ((), ()))
    logits_BLV = fp8_dot_general(h_BLD, w_DV, dims, preferred_element_type=out_dtype)
  else:
    logits_BLV = jnp.einsum("bld,dv->blv", h_BLD, w_DV, preferred_element_type=out_dtype)
  return _constrain(logits_BLV, ("batch", "length", "act_vocab"))


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
    if c.scan_layers and self.decode and not self.is_initializing():
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
    logits_BLV = head_logits(h_BLD, self.head_matrix(), self.cfg, fp8=self.cfg.fp8 and not self.decode)
    return logits_BLV if keep_dtype else logits_BLV.astype(jnp.float32)

  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, deterministic: bool = True):
    return self.logits(self.hidden(tokens_BL, positions_BL, segment_ids_BL, deterministic))
