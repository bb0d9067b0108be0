"""LoRA fine-tuning: data validation, the training loop, jobs and adapters."""
