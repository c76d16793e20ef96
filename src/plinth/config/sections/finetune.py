"""The `finetune` section and its multitask `TaskSpec`: base, method, data and heads.

    plinth config explain finetune
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from plinth.config.sections.base import Section


class TaskSpec(Section):
    """One task of a multitask fine-tune (`finetune.tasks`): its data, head and loss weight."""

    name: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Task name: its head is `heads.<name>` and its metrics `val/<name>/...`."""

    task: Literal["lm", "classification", "regression"] = "classification"
    """lm: instruction data through the language-model head (a per-task prompt lives in the
    data); classification/regression: a head of its own on the pooled hidden state."""

    dataset: str
    """Training JSONL of this task."""

    val_dataset: str | None = None
    """Validation JSONL; None holds out finetune.val_fraction of `dataset`."""

    labels: list[str] = Field(default_factory=list)
    """Class names (classification); empty: integer labels 0..num_labels-1."""

    num_labels: int | None = Field(None, ge=1)
    """Head outputs; None: len(labels) (classification) or 1 (regression)."""

    weight: float = Field(1.0, gt=0)
    """Multiplier of this task's loss in the sum the optimizer minimises."""

    text_field: str = "text"
    """JSON field holding the input text (classification/regression)."""

    label_field: str = "label"
    """JSON field holding the label (a class name, an integer, or a number for regression)."""


class FinetuneConfig(Section):
    """Adapting a pretrained model: base, data, method, adapter sizes, frozen parts and heads."""

    base: str | None = None
    """The pretrained model to start from: a plinth run or checkpoint directory, a directory
    written by `plinth import`, or a reference model by name (ref-smollm2, ref-minilm: imported
    on first use into ~/.cache/plinth/models)."""

    dataset: str | None = None
    """Training data, JSONL. lm: prompt/completion, Alpaca instruction/input/output or chat
    messages; classification/regression: objects with `text_field` and `label_field`."""

    val_dataset: str | None = None
    """Validation JSONL in the same format; None holds out `val_fraction` of `dataset`."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of `dataset` held out for validation when no val_dataset is given."""

    format: Literal["auto", "prompt_completion", "alpaca", "messages"] = "auto"
    """Instruction data layout; auto detects it from the first record."""

    chat_template: str = "auto"
    """auto: the base model's own chat template when its tokenizer has one, else the plain
    "### Instruction / ### Response" layout; none: always the plain layout; or a path to a
    Jinja2 template file."""

    system_prompt: str | None = None
    """System message prepended to every conversation (chat templates only)."""

    max_length: int = Field(512, ge=8)
    """Tokens per example (and per packed row). Longer examples are handled by `overlong`."""

    overlong: Literal["truncate", "drop"] = "truncate"
    """Examples longer than max_length: truncate keeps the start (counted in the run's events),
    drop skips them (counted)."""

    packing: bool = True
    """lm: put several short examples in one row (attention and positions stay inside each
    example), far fewer padding tokens; off: one example per row."""

    method: Literal["full", "lora", "dora", "qlora", "adapter", "prefix", "ia3"] = "lora"
    """full updates every weight (best quality, most memory); lora/dora train small low-rank
    updates (a few % of memory); qlora also stores the base in 4-bit; adapter, prefix and ia3
    are other parameter-efficient methods."""

    rank: int = Field(8, ge=1, le=4096)
    """LoRA/DoRA rank (adapter bottleneck for `adapter`, prefix length for `prefix`). Higher:
    more capacity and memory; 8-64 covers most tasks."""

    alpha: float = Field(16.0, gt=0)
    """LoRA scaling: updates are multiplied by alpha/rank. Keep alpha ~ 2*rank; change rank and
    alpha together."""

    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input. Helps small datasets; 0 for large ones."""

    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Name patterns (fnmatch) of linear layers that get adapters. Adding the MLP projections
    (gate_proj, up_proj, down_proj) costs memory and usually improves quality."""

    freeze_layers: int = Field(0, ge=0)
    """Freeze the embeddings and the first K transformer blocks (full fine-tuning). Saves memory
    and protects general knowledge in the lower layers."""

    trainable: list[str] = Field(default_factory=list)
    """If non-empty, train only parameters whose names match these patterns (plus adapters and
    heads), freezing everything else."""

    task: Literal["lm", "classification", "regression"] = "lm"
    """Head on top of the model: lm keeps the language-model head (SFT, continued pretraining);
    classification/regression add a pooled head trained with cross-entropy/MSE."""

    labels: list[str] = Field(default_factory=list)
    """Class names of a classification task, in head order; labels in the data must be one of
    them. Empty: integer labels 0..num_labels-1."""

    num_labels: int | None = Field(None, ge=1)
    """Outputs of the classification head; None: len(labels) (1 for regression)."""

    text_field: str = "text"
    """JSON field holding the input text (classification/regression)."""

    label_field: str = "label"
    """JSON field holding the label: a class name, an integer class, or a number (regression)."""

    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    """How a head sees a sequence: mean of the token states, the first (CLS) token, or the last
    real token. auto: mean for encoders (sentence-embedding models are trained so), last for
    decoders (the only token that has seen the whole input)."""

    tasks: list[TaskSpec] = Field(default_factory=list)
    """Multitask fine-tuning: several datasets, each with its own head (or the LM head) and loss
    weight. When set, the single-task fields above (dataset, task, labels, ...) are unused."""

    epochs: float = Field(3.0, gt=0)
    """Passes over the fine-tuning data. 1-3 for SFT; more risks overfitting small datasets."""

    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps even if `epochs` is not done."""

    @model_validator(mode="after")
    def _tasks_unique(self) -> FinetuneConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"finetune.tasks names must be unique; repeated: {', '.join(dup)}")
        return self
