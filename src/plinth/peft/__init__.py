"""Parameter-efficient fine-tuning: LoRA, DoRA, QLoRA, bottleneck adapters, prefix tuning and IA3
as transforms of a built model that keep the base parameter names.

    python -c "from plinth.config.schema import ModelConfig, FinetuneConfig; \
from plinth.models import build_model; from plinth.peft import *; \
m = build_model(ModelConfig(n_layers=2)); print(apply_method(m, FinetuneConfig(method='dora')))"

`apply_method(model, cfg.finetune)` (plinth.peft.apply) does the swap and freezes the base;
`merge`/`unmerge`, `disable_adapters`, `save_adapter`/`load_adapter` (peft's on-disk format,
plinth.peft.save) work on any model it produced. plinth.peft.names maps its layers to the
Hugging Face module names peft uses (save/load, and hints for Hugging Face target patterns).
"""

from plinth.peft.apply import (
    PEFT_METHODS,
    Summary,
    apply_method,
    base_fingerprint,
    count_parameters,
    disable_adapters,
    merge,
    unmerge,
)
from plinth.peft.save import load_adapter, save_adapter

__all__ = [
    "PEFT_METHODS",
    "Summary",
    "apply_method",
    "base_fingerprint",
    "count_parameters",
    "disable_adapters",
    "load_adapter",
    "merge",
    "save_adapter",
    "unmerge",
]
