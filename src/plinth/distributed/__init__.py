"""Parallelism applied from outside the model: checkpointing, compile, DDP/FSDP."""
