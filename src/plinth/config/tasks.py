"""The tasks a fine-tuning config describes: `finetune.tasks`, or the single task the top-level
`finetune.*` fields describe (named `main`), and the outputs of each task's head."""

from __future__ import annotations

from plinth.config.schema import Config, TaskSpec
from plinth.errors import UsageError

MAIN = "main"  # name of the single task the top-level finetune fields describe
REWARD = "reward"  # the 1-output head of a reward model (align.method=reward)


def task_specs(cfg: Config) -> list[TaskSpec]:
    """`finetune.tasks`, or the single task of the top-level fields."""
    ft = cfg.finetune
    if ft.tasks:
        return list(ft.tasks)
    if cfg.align.method == "reward" and cfg.align.dataset is not None:
        # a reward model is a regression head like any other: `plinth classify` scores with it
        return [TaskSpec(name=REWARD, task="regression", dataset=cfg.align.dataset,
                         val_dataset=cfg.align.val_dataset)]
    if ft.dataset is None:
        raise UsageError(
            "finetune.dataset is not set: give the training JSONL (e.g. "
            "finetune.dataset=configs/data/json_answers.train.jsonl), or list several tasks in "
            "finetune.tasks."
        )
    return [
        TaskSpec(
            name=MAIN,
            task=ft.task,
            dataset=ft.dataset,
            val_dataset=ft.val_dataset,
            labels=ft.labels,
            num_labels=ft.num_labels,
            text_field=ft.text_field,
            label_field=ft.label_field,
        )
    ]


def head_sizes(cfg: Config) -> dict[str, int]:
    """Task name -> outputs of its head (classification: num_labels or len(labels))."""
    sizes = {}
    for spec in task_specs_or_empty(cfg):
        if spec.task == "regression":
            sizes[spec.name] = spec.num_labels or 1
        elif spec.task == "classification":
            n = spec.num_labels or len(spec.labels)
            key = "finetune" if spec.name == MAIN else f"finetune.tasks[{spec.name}]"
            if n == 0:
                raise UsageError(
                    f"{key}: a classification task needs its classes: set {key}.labels to the "
                    f"class names (e.g. [negative, positive]) or {key}.num_labels for integer "
                    "labels."
                )
            if spec.labels and spec.num_labels and spec.num_labels != len(spec.labels):
                raise UsageError(
                    f"{key}.num_labels={spec.num_labels} but {key}.labels names "
                    f"{len(spec.labels)} classes; drop num_labels (it follows the labels)."
                )
            sizes[spec.name] = n
    return sizes


def task_specs_or_empty(cfg: Config) -> list[TaskSpec]:
    try:
        return task_specs(cfg)
    except UsageError:  # no data configured: a model without heads (e.g. loading for generate)
        return []


def head_labels(cfg: Config) -> dict[str, tuple[str, list[str]]]:
    """Task name -> (kind, names of its head's outputs) for every classification/regression
    head: the class names (or "0".."n-1" for integer labels), or `value` (`value_0`, ... for a
    head with several outputs) for regression. Empty for a model without heads."""
    sizes = head_sizes(cfg)
    out = {}
    for spec in task_specs_or_empty(cfg):
        if spec.name not in sizes:
            continue
        n = sizes[spec.name]
        if spec.task == "classification":
            names = list(spec.labels) if spec.labels else [str(i) for i in range(n)]
        else:
            names = ["value"] if n == 1 else [f"value_{i}" for i in range(n)]
        out[spec.name] = (spec.task, names)
    return out
