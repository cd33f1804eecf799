"""Character-level GPT on tiny Shakespeare, the PyTorch nanoGPT reference setting (6x384, context 256).

    python -m llm_jax.train --config=configs/shakespeare_char.py --workdir=runs/shakespeare \
        --config.data.corpus=../shared/data/tinyshakespeare_train.txt \
        --config.data.val_corpus=../shared/data/tinyshakespeare_val.txt
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.corpus = ""  # must be given: a text file (or glob) of training text
  c.data.val_corpus = ""  # must be given: the validation text
  c.data.tokenizer.type = "char"
  c.data.tokenizer.vocab_size = 384  # 65 characters + specials + 256 byte-fallback pieces, padded
  c.data.tokenizer.character_coverage = 1.0
  c.data.dedup_exact = False  # one play is one document: nothing to deduplicate
  c.data.near_dup_threshold = 0.0
  c.data.scrub_pii = False
  c.data.min_doc_chars = 1
  c.model.num_layers = 6
  c.model.d_model = 384
  c.model.num_heads = 6
  c.model.max_seq_len = 256
  c.model.dropout = 0.2
  c.model.attention_dropout = 0.2  # nanoGPT drops attention probabilities too
  c.model.use_bias = False
  c.model.scan_unroll = 6
  c.train.seq_len = 256
  c.train.global_batch_size = 64
  c.train.steps = 5000
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.schedule = "cosine"
  c.train.min_lr_ratio = 0.1  # to 1e-4
  c.train.weight_decay = 0.1
  c.train.b2 = 0.99
  c.train.eval_every = 250
  c.train.eval_batches = 50
  c.train.checkpoint_every = 1000
  c.train.sample_every = 1000
  c.train.sample_prompts = "ROMEO:,KING"
  return c
