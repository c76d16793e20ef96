"""The config of a new fine-tune: its base model's config is the lowest layer.

    python -c "from plinth.finetune.config import load_finetune_config; \
print(load_finetune_config(['configs/sft-smollm2-lora.yaml'])[0].config.model)"

`finetune.base` fixes the architecture and tokenizer, so the base's model section sits under
the preset, files and command line (source "base model DIR"); data paths a config file gives
are read next to that file. Used by `plinth finetune` and by `plinth config` (so the model it
shows is the one that will train).
"""

from __future__ import annotations

from pathlib import Path

from plinth.config.load import Resolved, load_config
from plinth.errors import UsageError
from plinth.finetune.base import base_defaults, check_architecture
from plinth.load import resolve

BASE_SOURCE = "base model"


def load_finetune_config(
    files: list, overrides: list[str] = ()
) -> tuple[Resolved, Path]:
    """Config of a new fine-tune: the base's model and tokenizer as the lowest layer."""
    first = load_config(files, overrides)
    base = first.config.finetune.base
    if base is None:
        raise UsageError(
            "finetune.base is not set: name the pretrained model to start from (a plinth run, a "
            "`plinth import` directory, a Hugging Face directory or .gguf file, or ref-smollm2 / "
            "ref-minilm), e.g. finetune.base=ref-smollm2."
        )
    base_dir = resolve(base, "finetune.base")
    defaults = base_defaults(base_dir)
    resolved = load_config(
        files, overrides, defaults=defaults, defaults_source=f"{BASE_SOURCE} {base_dir}"
    )
    check_architecture(resolved, defaults, base_dir)
    relative_to_config(resolved)
    return resolved, base_dir


def relative_to_config(resolved: Resolved) -> None:
    """Data paths a config file gives that do not exist from here are read next to that file
    (so `plinth finetune sft-smollm2-lora` finds the recipe's data from any directory)."""
    ft = resolved.config.finetune

    def fix(value: str | None, key: str) -> str | None:
        src = resolved.source(key)
        if value is None or Path(value).is_absolute() or Path(value).exists():
            return value
        if not src.startswith("file "):
            return value
        cand = Path(src[len("file "):]).parent / value
        return str(cand) if cand.exists() else value

    for key in ("dataset", "val_dataset", "chat_template"):
        setattr(ft, key, fix(getattr(ft, key), f"finetune.{key}"))
    for t in ft.tasks:
        t.dataset = fix(t.dataset, "finetune.tasks")
        t.val_dataset = fix(t.val_dataset, "finetune.tasks")
