"""Task scores during training (`tracking.eval_tasks`): the score hook a training recipe passes
to the loop (plinth.train.hooks), which records them like validation metrics.

    plinth pretrain configs/quickstart.yaml tracking.eval_tasks=[capitals,arithmetic]
"""

from __future__ import annotations

from plinth.config.schema import Config
from plinth.errors import PlinthError


class TaskScorer:
    """Periodic task evaluation on rank 0: the tasks are loaded once (bad task files fail
    before training starts) and scored on the first `eval_tasks_limit` examples each time, so
    the numbers compare across steps."""

    def __init__(self, cfg: Config, tasks, tokenizer, eos_id, max_len: int):
        self.cfg, self.tasks, self.tokenizer = cfg, tasks, tokenizer
        self.eos_id, self.max_len = eos_id, max_len
        t = cfg.tracking
        self.every = t.eval_tasks_every or t.eval_every

    @classmethod
    def create(cls, cfg: Config, task, sharded: bool) -> TaskScorer | None:
        """The scorer for `task` (a plinth.train.task.Task), or None when no tasks are asked
        for; refuses what cannot be scored (sharded weights, models without text)."""
        if not cfg.tracking.eval_tasks:
            return None
        if sharded:
            raise PlinthError(
                "tracking.eval_tasks is not supported with distributed.strategy=fsdp/hsdp yet "
                "(rank 0 scores the tasks alone, and sharded weights need every rank). Score "
                "checkpoints afterwards with `plinth eval RUN --tasks ...`, or use ddp."
            )
        io = task.text_io()
        if cfg.model.arch != "decoder" or io is None:
            raise PlinthError(
                f"tracking.eval_tasks={cfg.tracking.eval_tasks} needs a decoder (tasks are "
                f"scored by next-token log-likelihood and generation); this is an "
                f"{cfg.model.arch}. Set tracking.eval_tasks=[] or evaluate a decoder."
            )
        from plinth.eval.tasks import load_tasks

        return cls(
            cfg, load_tasks(cfg.tracking.eval_tasks), io[0], io[1], cfg.model.max_seq_len
        )

    def due(self, step: int, is_last: bool) -> bool:
        return step % self.every == 0 or is_last

    def __call__(self, model) -> dict[str, float]:
        from plinth.eval.scoring import task_metrics

        scores = task_metrics(
            model,
            self.tokenizer,
            self.tasks,
            self.eos_id,
            self.max_len,
            limit=self.cfg.tracking.eval_tasks_limit,
        )
        return {f"eval/{k}": float(v) for k, v in scores.items()}
