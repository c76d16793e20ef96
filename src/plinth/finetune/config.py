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

from plinth.config.bases import load_with_base_dir, relative_to_config  # noqa: F401
from plinth.config.load import Resolved, load_config
from plinth.errors import UsageError
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
    return load_with_base_dir(files, overrides, base_dir), base_dir
