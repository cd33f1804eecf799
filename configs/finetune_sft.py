"""Supervised fine-tuning of a `tiny` run on a JSONL of prompt/response pairs (or chat messages), with
the loss on response tokens only (docs/finetune.md).

    python -m llm_jax.train --config=configs/finetune_sft.py --workdir=runs/sft \
        --config.init_from=runs/tiny --config.finetune.sft.train_file=data/sft_train.jsonl \
        [--config.finetune.sft.val_file=data/sft_val.jsonl]
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.finetune.sft.prompt_template = "### Prompt:\n{prompt}\n\n### Response:\n"
  c.train.steps = 200
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 10
  c.train.checkpoint_every = 100
  c.train.sample_every = 0
  return c
