"""A tiny BERT-style masked-language model on the embedded stdlib corpus that trains on a laptop CPU.

    python -m llm_jax.train --config=configs/bert_tiny.py --workdir=runs/bert_tiny

The decoder's blocks with model.causal=False (bidirectional attention), trained by llm_jax.encoder: 15% of
tokens chosen (80% [MASK], 10% random, 10% kept), loss on the chosen ones. 2.2M parameters (8.8 MB of float32)
(4 layers x 192, context 128, BPE 2048 with [MASK]/[CLS]/[SEP]), 600 steps of 16 x 128 tokens; on a
shared 2-core CPU (2026-11-30, about 17 min) the held-out masked-LM loss went 6.14 -> 5.67 from step 100
to 600 and masked-token accuracy 6.5% -> 12.3%, still falling. val_loss is the
masked-LM loss on masked held-out windows, val_mlm_accuracy the share of them predicted exactly.
Classification from this run: docs/finetune.md.
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.tokenizer.encoder_pieces = True  # [MASK]=4, [CLS]=5, [SEP]=6
  c.model.causal = False
  c.encoder.task = "mlm"
  c.train.sample_every = 0  # an encoder does not generate
  c.train.learning_rate = 1e-3
  return c
