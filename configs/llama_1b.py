"""A LLaMA-style 1.0B decoder (tied embeddings, vocab 32000): 16 layers, 2048 wide, 32 heads (8 kv),
SwiGLU 8192, RoPE, context 2048.

    python -m llm_jax.train --config=configs/llama_1b.py --workdir=runs/llama_1b \
        --config.data.corpus='corpus/*.jsonl'
    python -m llm_jax.bench --config=configs/llama_1b.py --synthetic
"""

from configs import base


def llama(c, layers: int, width: int, heads: int, kv_heads: int, mlp: int, context: int):
  """Sets the LLaMA architecture fields on a base config."""
  c.data.tokenizer.vocab_size = 32000
  c.model.num_layers = layers
  c.model.d_model = width
  c.model.num_heads = heads
  c.model.num_kv_heads = kv_heads
  c.model.mlp_dim = mlp
  c.model.max_seq_len = context
  c.model.positions = "rope"
  c.model.rope_theta = 500_000.0
  c.model.norm = "rmsnorm"
  c.model.activation = "swiglu"
  c.model.tie_embeddings = False
  c.model.use_bias = False
  c.train.seq_len = context
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.train.weight_decay = 0.1
  return c


def get_config():
  c = llama(base.get_config(), layers=16, width=2048, heads=32, kv_heads=8, mlp=8192, context=2048)
  c.model.tie_embeddings = True
  c.model.remat = "none"  # 16 x 2048 per pass fits one 141 GB GPU without remat (docs/performance.md)
  c.model.scan_unroll = 16
  c.sharding.data = 1
  c.sharding.fsdp = -1
  c.train.global_batch_size = 256
  c.train.microbatches = 16
  c.train.steps = 50_000
  return c
