"""A LLaMA-3-style 8B decoder: 32 layers, 4096 wide, 32 heads (8 kv), SwiGLU 14336, RoPE; FSDP by default.

    python -m llm_jax.train --config=configs/llama_8b.py --workdir=runs/llama_8b \
        --config.data.corpus='corpus/*.jsonl'

No remat and straight-line layers: 2 rows x 4096 per GPU per pass on 4 H200s ran at 55.6% MFU, 68.7 GiB
peak (docs/launch.md, `bash bench/gpu_multi.sh llama8b_sweep table`); the dry run plans 87 GiB with the
accumulator. On 80 GB GPUs add `--config.model.remat=dots_no_batch` (54.0%, 56.2 GiB).
"""

from configs import base
from configs.llama_1b import llama


def get_config():
  c = llama(base.get_config(), layers=32, width=4096, heads=32, kv_heads=8, mlp=14336, context=4096)
  c.model.remat = "none"
  c.model.scan_unroll = 32
  c.sharding.data = 1
  c.sharding.fsdp = -1
  c.train.global_batch_size = 256
  c.train.microbatches = 32
  c.train.learning_rate = 1.5e-4
  c.train.steps = 100_000
  return c
