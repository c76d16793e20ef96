"""Fine-tuning: a pretrained base (plinth.finetune.base), its data as rows
(plinth.finetune.data), task heads (plinth.models.heads) and the task the training loop runs
(plinth.finetune.task). The command is `plinth finetune` (plinth.recipes.finetune)."""

from plinth.finetune.task import FinetuneTask, build_task

__all__ = ["FinetuneTask", "build_task"]
