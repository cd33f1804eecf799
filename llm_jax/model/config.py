"""The model's own frozen settings, resolved from `config.model` (hashable, so flax modules can hold it)."""

from __future__ import annotations

import dataclasses

import jax

from llm_jax import config as config_lib
from llm_jax.model.gelu_kernel import on_hopper

DECODE_LEVERS = ("qkv", "norm", "kv")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural choice of the decoder, with derived sizes filled in."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  positions: str = "learned"
  rope_theta: float = 10_000.0
  # RoPE frequency scaling (imported long-context checkpoints): "none"; "linear" (every frequency / factor);
  # "llama3" (LLaMA 3.1: wavelengths above original_max_len / low_freq_factor divided by factor, below
  # original_max_len / high_freq_factor kept, smoothly interpolated between).
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  activation: str = "gelu"
  tie_embeddings: bool = True
  use_bias: bool = True
  dropout: float = 0.0
  attention_dropout: float = 0.0  # dropout on attention probabilities (training; XLA attention)
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "xla"
  scan_layers: bool = True
  remat: str = "none"
  init_std: float = 0.02
  scan_unroll: int = 1  # layers per scan iteration (num_layers: straight-line code, same parameters)
  logits_dtype: str = "float32"  # the head matmul's output dtype (the loss upcasts inside fusions)
  causal: bool = True  # False: bidirectional attention (an encoder; no KV-cache decoding)
  fp8: bool = False  # MLP matmuls in FP8 (current scaling; not in KV-cache decoding)
  fp8_head: bool = False  # with fp8: the output head's matmul in FP8 too
  # "mosaic": the GELU MLP's backward dh = (dY @ W^T) * gelu'(h) in one Mosaic GPU kernel (Hopper, not
  # with fp8; llm_jax.model.gelu_kernel); "xla": XLA's GEMM then fusion. from_config resolves "auto".
  gelu_kernel: str = "xla"
  # Decode-only rewrites, comma-separated, set together with the parameters they need by
  # `model.unstack_layers(params, cfg, levers=...)` (never in training; docs/serving.md):
  # "qkv" one [D, N+2K, H] query/key/value matmul (SwiGLU: one [D, 2, F] gate/up matmul);
  # "norm" (with "qkv") the pre-attention and pre-MLP norms folded into the next matmul;
  # "kv" one KV cache [layers, 2, B, K, S, H] written once per step for every layer.
  decode_levers: str = ""

  def levers(self) -> frozenset[str]:
    """The set of `decode_levers` (unknown names or "norm" without "qkv" raise ValueError)."""
    got = frozenset(x.strip() for x in self.decode_levers.split(",") if x.strip())
    unknown = sorted(got - set(DECODE_LEVERS))
    if unknown:
      raise ValueError(f"decode_levers: unknown {unknown}; known: {', '.join(DECODE_LEVERS)}")
    if "norm" in got and "qkv" not in got:
      raise ValueError("decode_levers: 'norm' folds into the fused matmuls; it needs 'qkv' too")
    return got

  @classmethod
  def from_config(cls, config, tokenizer_size: int | None = None, platform: str | None = None):
    """Resolves `config.model` (vocab from the tokenizer when model.vocab_size == 0, 'auto' dtypes)."""
    m = config.model
    vocab = m.vocab_size or config_lib.padded_vocab(tokenizer_size or 0, m.vocab_multiple)
    if vocab <= 0:
      raise config_lib.ConfigError("model.vocab_size is 0 and no tokenizer size was given")
    head_dim = m.head_dim or m.d_model // m.num_heads
    if m.mlp_dim:
      mlp = m.mlp_dim
    elif m.activation == "swiglu":
      mlp = 256 * ((int(8 * m.d_model / 3) + 255) // 256)
    else:
      mlp = 4 * m.d_model
    if platform is None:
      platform = jax.default_backend()
    attention = m.attention
    if attention == "auto":
      attention = "cudnn" if platform == "gpu" else "xla"
    dtype = config_lib.compute_dtype(config, platform)
    logits_dtype = dtype if m.get("logits_dtype", "auto") == "auto" else m.logits_dtype
    return cls(
      vocab_size=int(vocab),
      num_layers=m.num_layers,
      d_model=m.d_model,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads or m.num_heads,
      head_dim=head_dim,
      mlp_dim=mlp,
      max_seq_len=m.max_seq_len,
      positions=m.positions,
      rope_theta=float(m.rope_theta),
      rope_scaling=m.get("rope_scaling", "none"),
      rope_scaling_factor=float(m.get("rope_scaling_factor", 1.0)),
      rope_low_freq_factor=float(m.get("rope_low_freq_factor", 1.0)),
      rope_high_freq_factor=float(m.get("rope_high_freq_factor", 4.0)),
      rope_original_max_len=int(m.get("rope_original_max_len", 8192)),
      norm=m.norm,
      norm_eps=float(m.norm_eps),
      activation=m.activation,
      tie_embeddings=m.tie_embeddings,
      use_bias=m.use_bias,
      dropout=float(m.dropout),
      attention_dropout=float(m.get("attention_dropout", 0.0)),
      dtype=dtype,
      param_dtype=m.param_dtype,
      logits_dtype=logits_dtype,
      scan_unroll=max(1, min(int(m.get("scan_unroll", 1)), m.num_layers)),
      attention=attention,
      scan_layers=m.scan_layers,
      remat=m.remat,
      init_std=float(m.init_std),
      causal=bool(m.get("causal", True)),
      fp8=bool(m.get("fp8", False)),
      fp8_head=bool(m.get("fp8_head", False)),
      gelu_kernel=resolve_gelu_kernel(m, platform),
    )

  def param_count(self, include_embedding: bool = True) -> int:
    """Parameters of the decoder (counted from shapes, without building it)."""
    d, h, k, q, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    b = 1 if self.use_bias else 0
    attn = d * h * q + 2 * d * k * q + h * q * d + b * (h * q + 2 * k * q + d)
    n_up = 2 if self.activation == "swiglu" else 1  # swiglu has gate and up projections
    mlp = (n_up + 1) * d * f + b * (n_up * f + d)
    norms = 2 * (d + b * d)
    per_layer = attn + mlp + norms
    emb = self.vocab_size * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    pos = self.max_seq_len * d if self.positions == "learned" else 0
    final = d + b * d
    total = self.num_layers * per_layer + final + head + (emb + pos if include_embedding else 0)
    return int(total)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6N (N without input embeddings) + 12 * layers * heads * head_dim * T."""
    n = self.param_count(include_embedding=False)
    if self.tie_embeddings:
      n += self.vocab_size * self.d_model  # the tied head still does its matmul
    return 6.0 * n + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len


def _gelu_kernel_usable(m, platform: str) -> bool:
  return on_hopper(platform) and m.activation == "gelu" and not m.get("fp8", False)


def resolve_gelu_kernel(m, platform: str) -> str:
  """model.gelu_kernel as the model runs it here: "mosaic" (asked for, or `auto`) on Hopper GPUs for a GELU
  MLP without FP8, else "xla". Only training's backward pass differs, so a run trained with the kernel
  still resumes checks, decodes and evaluates anywhere; training itself calls check_gelu_kernel."""
  usable = _gelu_kernel_usable(m, platform)
  return "mosaic" if usable and m.get("gelu_kernel", "xla") in ("auto", "mosaic") else "xla"


def check_gelu_kernel(m, platform: str | None = None) -> None:
  """Training's check: model.gelu_kernel=mosaic where it cannot run is a ConfigError naming the key."""
  platform = platform or jax.default_backend()
  if m.get("gelu_kernel", "xla") == "mosaic" and not _gelu_kernel_usable(m, platform):
    raise config_lib.ConfigError(
      f"model.gelu_kernel=mosaic needs a Hopper GPU (this is {platform}), model.activation=gelu (got "
      f"{m.activation}) and model.fp8=False; use model.gelu_kernel=auto or xla"
    )
