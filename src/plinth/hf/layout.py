"""The files of a model directory `plinth import` writes (and `plinth export` reads back), and
output folders written whole or not at all.

    python -c "from plinth.hf.layout import TOKENIZER_FILES; print(TOKENIZER_FILES)"

An imported model directory:

    config.yaml           plinth config; `model:` translated from config.json (load_config reads it)
    model.safetensors     fp32 weights under plinth's parameter names
    tokenizer.json        the model's tokenizer (+ tokenizer_config.json, chat template, ... when
                          the source has them)
    hf_config.json        the original config.json (synthesised for GGUF): the base of an export
    hf_extra.safetensors  tensors plinth has no place for (BERT's pooler, task heads), kept aside
                          under their original names and written back by export
    import.json           source, family, model_type, prefix, parameter count, notes, and the
                          fingerprint of the weights (plinth.hf.fingerprints), the same value an
                          adapter trained on this model records, so it refuses another base
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from plinth.config.bases import IMPORT_FILE  # noqa: F401
from plinth.errors import UsageError

HF_CONFIG_FILE = "hf_config.json"
EXTRA_FILE = "hf_extra.safetensors"
WEIGHTS_FILE = "model.safetensors"
# tokenizer side files copied along with tokenizer.json (chat template, special tokens, ...)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def check_out(out: Path, force: bool) -> None:
    """Refuse an `out` that holds something unless `force` (then `staged` replaces it)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"{out} already exists and is not empty; choose another OUT or pass "
                         "--force to replace it")


@contextlib.contextmanager
def staged(out: Path):
    """A scratch folder beside `out`, renamed into place when the body finishes and removed
    when it fails, so a crash or a refused input never leaves half a model."""
    stage = out.with_name(out.name + ".tmp")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    stage.rename(out)
