"""BERT-base shapes (12 layers x 768, 12 heads, MLP 3072, context 512, vocab 30522 -> 110M parameters)
as a masked-language model, for one GPU.

    python -m llm_jax.train --config=configs/bert_base.py --workdir=runs/bert_base \\
        --config.data.corpus='data/*.jsonl'

Pre-norm blocks, GELU, learned positions, tied output head (BERT's post-norm and NSP are left out).
256 x 512 tokens per step (as BERT's 256 x 512 phase), AdamW 1e-4 with 10k warm-up steps.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.corpus = "stdlib"
  c.data.tokenizer.vocab_size = 30522
  c.data.tokenizer.encoder_pieces = True
  c.model.causal = False
  c.model.vocab_multiple = 64
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.max_seq_len = 512
  c.model.norm_eps = 1e-12
  c.model.dropout = 0.1
  c.encoder.task = "mlm"
  c.train.seq_len = 512
  c.train.global_batch_size = 256
  c.train.steps = 100_000
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 10_000
  c.train.b2 = 0.999
  c.train.weight_decay = 0.01
  c.train.eval_every = 2000
  c.train.eval_batches = 8
  c.train.checkpoint_every = 5000
  c.train.sample_every = 0
  return c
