"""GPT-2 small (124M): 12 layers, 768 wide, 12 heads, context 1024, vocab 50257 padded to 50304.

    python -m llm_jax.train --config=configs/gpt_small.py --workdir=runs/gpt_small \
        --config.data.corpus='corpus/*.txt'
    python -m llm_jax.bench --config=configs/gpt_small.py --synthetic
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.tokenizer.vocab_size = 50257
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.max_seq_len = 1024
  c.model.dropout = 0.0
  c.model.scan_unroll = 12  # straight-line layers: 1.5x the scanned step's tokens/s (docs/performance.md)
  c.train.seq_len = 1024
  c.train.global_batch_size = 480  # about 0.5M tokens a step, as GPT-2
  c.train.microbatches = 8  # 60 x 1024 per pass: 25.7 GiB without biases on an H200 (4 passes of 120:
  # 49.5 GiB and, with the GELU kernel, no faster: docs/performance.md "Round nine")
  c.train.steps = 20_000
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 700
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b2 = 0.95
  c.train.eval_every = 500
  c.train.eval_batches = 20
  c.train.checkpoint_every = 1000
  c.train.sample_every = 1000
  return c
