"""Fine-tuning: start from trained weights (init_from), freeze groups (freeze), LoRA adapters (lora),
supervised fine-tuning data (sft). docs/finetune.md explains them with a worked example."""
