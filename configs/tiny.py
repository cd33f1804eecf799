"""A small GPT on the embedded stdlib corpus (Python docs and code) that trains on a laptop CPU in minutes.

    python -m llm_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""
from configs import base


def get_config():
  c = base.get_config()
  c.data.corpus = "stdlib"
  c.data.tokenizer.vocab_size = 2048
  c.model.num_layers = 4
  c.model.d_model = 192
  c.model.num_heads = 6
  c.model.max_seq_len = 128
  c.train.seq_len = 128
  c.train.global_batch_size = 16
  c.train.steps = 600
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.1
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.train.checkpoint_every = 100
  c.train.sample_every = 200
  c.train.log_every = 10
  return c
