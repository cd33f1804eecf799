"""A LLaMA-3-style 8B decoder: 32 layers, 4096 wide, 32 heads (8 kv), SwiGLU 14336, RoPE; FSDP by default.

    python -m llm_jax.train --config=configs/llama_8b.py --workdir=runs/llama_8b \
        --config.data.corpus='corpus/*.jsonl'
"""

from configs import base
from configs.llama_1b import llama


def get_config():
  c = llama(base.get_config(), layers=32, width=4096, heads=32, kv_heads=8, mlp=14336, context=4096)
  c.model.remat = "full"
  c.sharding.data = 1
  c.sharding.fsdp = -1
  c.train.global_batch_size = 256
  c.train.microbatches = 32
  c.train.learning_rate = 1.5e-4
  c.train.steps = 100_000
  return c
