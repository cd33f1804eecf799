"""Full fine-tune of a `tiny` run on the stdlib 'code' domain (docs/finetune.md).

    python -m llm_jax.train --config=configs/finetune_code.py --workdir=runs/ft_code \
        --config.init_from=runs/tiny_docs
    # freeze the embeddings and the bottom two blocks:
    #   --config.finetune.freeze_embeddings=True --config.finetune.freeze_blocks=2
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.mixture = "code=1"  # the same prepared corpus (and tokenizer) as the source, code windows only
  c.train.steps = 300
  c.train.learning_rate = 1e-3  # below pretraining's: start from good weights, keep most of them
  c.train.warmup_steps = 20
  c.train.checkpoint_every = 100
  return c
