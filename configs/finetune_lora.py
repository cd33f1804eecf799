"""LoRA fine-tune of a `tiny` run on the stdlib 'code' domain: rank-8 adapters on every attention and
MLP kernel; only the adapters train and are checkpointed (docs/finetune.md).

    python -m llm_jax.train --config=configs/finetune_lora.py --workdir=runs/ft_lora \
        --config.init_from=runs/tiny_docs
    python -m llm_jax.export --workdir=runs/ft_lora --out=packages/ft_lora   # adapters merged
"""

from configs import finetune_code


def get_config():
  c = finetune_code.get_config()
  c.finetune.lora.rank = 8
  c.finetune.lora.alpha = 16.0
  c.train.learning_rate = 5e-3  # adapters start at zero effect and need larger steps
  c.train.weight_decay = 0.0
  return c
