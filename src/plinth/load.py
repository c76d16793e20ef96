"""Where a model comes from: the one place that resolves a model argument and loads it.

    python -c "from plinth.load import load_model; print(load_model('ref-smollm2').cfg.model)"

A model argument is a plinth run directory (its newest good checkpoint), a checkpoint directory
(RUN/checkpoints/step_XXXXXXX), a `plinth import` directory, a Hugging Face model directory
(config.json + weights), a .gguf file, or a reference model by name (ref-smollm2, ref-minilm).
The last three are imported once into $PLINTH_HOME/models (default ~/.cache/plinth/models),
keyed by source, and reused. `load_model` returns the model with its weights, tokenizer, config,
special-token roles and chat template; every command and library module loads through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from plinth.config.bases import import_dir, models_home
from plinth.errors import UsageError
from plinth.hf.layout import IMPORT_FILE

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


# ---------------------------------------------------------------------------------- resolving


def find_run(path: Path) -> tuple[Path, Path | None]:
    """(run directory, explicit weights directory or None) for a run dir, a checkpoint dir or
    an imported model dir (`plinth import`: config.yaml and model.safetensors side by side,
    plus import.json; it is its own weights directory)."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        if (path / IMPORT_FILE).is_file() and (path / "model.safetensors").is_file():
            return path, path
        return path, None
    if (path / "model.safetensors").is_file() and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, path
    raise UsageError(
        f"{path} is neither a plinth run directory (with config.yaml), a checkpoint "
        "directory (with model.safetensors, under RUN/checkpoints/) nor an imported model "
        "(`plinth import`). `plinth runs` lists runs."
    )


def resolve(spec: str | Path, key: str = "model") -> Path:
    """The local directory holding a model argument's config.yaml: a run / checkpoint / `plinth
    import` directory as is; a Hugging Face directory, a .gguf file or a reference name imported
    once into $PLINTH_HOME/models. `key` names the argument in the error (e.g. finetune.base)."""
    from plinth.hf.importer import REFERENCES, reference_path

    spec = str(spec)
    if spec in REFERENCES:
        return _imported(reference_path(spec), models_home() / spec)
    p = Path(spec).expanduser()
    if not p.exists():
        raise UsageError(
            f"{key} {spec!r}: no such file or directory. Give a plinth run or checkpoint "
            "directory, a `plinth import` output, a Hugging Face model directory (config.json + "
            f"weights), a .gguf file, or a reference model: {', '.join(REFERENCES)}."
        )
    hf_dir = (p / "config.json").is_file() and not (p / "config.yaml").is_file()
    if (p.is_file() and p.suffix == ".gguf") or hf_dir:
        return _imported(p, import_dir(p))
    find_run(p)  # a clear error for anything else
    return p


def _imported(source: Path, out: Path) -> Path:
    from plinth.hf.importer import import_model

    if (out / IMPORT_FILE).is_file():
        return out
    print(f"importing {source} into {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(import_model(source, out))


def display_name(spec: str | Path) -> str:
    """A short name for a model argument (the reference name, else the directory's name)."""
    from plinth.hf.importer import REFERENCES

    spec = str(spec)
    return spec if spec in REFERENCES else Path(spec).expanduser().name


# ------------------------------------------------------------------------------------ weights


def load_weights_into(model: nn.Module, model_dir: Path) -> tuple[str, int | None]:
    """Load a run's newest good checkpoint, a checkpoint's or an imported directory's weights
    into a freshly built model. Returns (the weights path read, its step; None for an import)."""
    from safetensors.torch import load_file

    from plinth.train import state as ckpt

    run, explicit = find_run(model_dir)
    if explicit == run:  # an imported model: plain weights, no training state
        ckpt.load_weights(model, load_file(str(run / ckpt.MODEL_FILE)))
        return str(run / ckpt.MODEL_FILE), None
    loaded = ckpt.load_checkpoint(explicit) if explicit else ckpt.load_latest(run / "checkpoints")
    loaded.load_into(model)  # single file, or a sharded (DCP) checkpoint consolidated here
    step = loaded.meta.get("step")
    return str(loaded.path), int(step) if step is not None else None


def build_finetune_model(cfg, base_dir: Path | None, device=None) -> nn.Module:
    """A fine-tune's model: the base (weights from base_dir, or as initialised), its method
    (plinth.peft) and one head per classification/regression task, on `device`."""
    from plinth.config.tasks import head_sizes
    from plinth.models import build_model
    from plinth.models.heads import add_heads
    from plinth.peft import apply_method
    from plinth.peft.apply import count_parameters

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if base_dir is not None:
        load_weights_into(model, base_dir)
    summary = apply_method(model, cfg.finetune)
    sizes = head_sizes(cfg)
    if sizes:
        add_heads(model, sizes, cfg.seed)
        summary.trainable, summary.total = count_parameters(model)
        summary.modules = [*summary.modules, *(f"heads.{n}" for n in sizes)]
    model.peft_summary = summary
    return model.to(device) if device is not None else model


def load_trained(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, config) from a run, checkpoint or imported directory."""
    m = load_model(path, device=device, resolve_spec=False, chat=False)
    return m.model, m.tokenizer, m.cfg


# ------------------------------------------------------------------------ tokens and template


def token_text(model_dir: Path, key: str) -> str:
    """A special token's text from tokenizer_config.json (`bos_token`, `eos_token`; a string or
    an AddedToken dict), "" when absent."""
    tc = Path(model_dir) / TOKENIZER_CONFIG
    if tc.is_file():
        v = json.loads(tc.read_text()).get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            return v
    return ""


def token_roles(model_dir: Path, tokenizer) -> dict[str, int]:
    """Role (eos, pad, bos) -> id: from import.json for imported models, from the base's record
    in manifest.json for a fine-tune run, else plinth's own special tokens."""
    names = {"eos": "<|endoftext|>", "pad": "<|pad|>", "bos": "<|bos|>"}
    rec, manifest = Path(model_dir) / IMPORT_FILE, Path(model_dir) / "manifest.json"
    if rec.is_file():
        names = json.loads(rec.read_text()).get("special_tokens", {})
    elif manifest.is_file():  # a fine-tune run being resumed: its base's roles
        names = json.loads(manifest.read_text()).get("base", {}).get("special_tokens") or names
    out = {}
    for role, text in names.items():
        tid = tokenizer.token_to_id(text) if text else None
        if tid is not None:
            out[role] = tid
    return out


def first_special_id(tokenizer, cfg) -> int | None:
    """The id of the config's first special token: plinth's convention for end of sequence."""
    specials = list(cfg.data.tokenizer.special_tokens or [])
    if not specials or tokenizer is None:
        return None
    return tokenizer.token_to_id(specials[0])


def eos_ids(model_dir: Path, tokenizer, cfg) -> list[int]:
    """Every id that ends generation: the config's first special token, the import record's eos
    and tokenizer_config.json's eos_token."""
    ids = {first_special_id(tokenizer, cfg)}
    t = _record_eos_text(model_dir)
    if t is not None:
        ids.add(tokenizer.token_to_id(t))
    t = token_text(model_dir, "eos_token")
    if t:
        ids.add(tokenizer.token_to_id(t))
    return sorted(i for i in ids if i is not None)


def eval_eos_id(model_dir: Path, tokenizer, cfg) -> int | None:
    """The one eos id scoring stops at: the import record's eos, else the first special."""
    t = _record_eos_text(model_dir)
    return tokenizer.token_to_id(t) if t is not None else first_special_id(tokenizer, cfg)


def _record_eos_text(model_dir: Path) -> str | None:
    """The eos token's text in an imported model's import.json (None: no record, or no eos)."""
    rec = Path(model_dir) / IMPORT_FILE
    if not rec.is_file():
        return None
    return json.loads(rec.read_text()).get("special_tokens", {}).get("eos")


def chat_template_source(setting: str, model_dir: Path) -> str | None:
    """The Jinja2 chat template text a setting selects: a file, `auto` (the model's own, from
    chat_template.jinja or tokenizer_config.json; None when it has none) or `none`."""
    found = chat_template_origin(setting, model_dir)
    if found is None:
        return None
    p = Path(found)
    try:
        text = p.read_text(encoding="utf-8")
        if p.name != TOKENIZER_CONFIG:
            return text
        tpl = json.loads(text).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError) as e:
        raise UsageError(
            f"chat template {p}: cannot read it ({type(e).__name__}: {str(e)[:200]}); a chat "
            "template is a UTF-8 Jinja2 text file (or tokenizer_config.json's chat_template). "
            "Fix or remove the file, or set finetune.chat_template=none."
        ) from None
    return tpl if isinstance(tpl, str) else None


def chat_template_origin(setting: str, model_dir: Path) -> str | None:
    """The file a chat template setting reads (see chat_template_source), for messages."""
    if setting == "none":
        return None
    if setting != "auto":
        p = Path(setting).expanduser()
        if not p.is_file():
            raise UsageError(
                f"finetune.chat_template={setting}: no such file. Give a Jinja2 template file, "
                "`auto` (the base model's own, when it has one) or `none` (plain layout)."
            )
        return str(p)
    for name in (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG):
        if (Path(model_dir) / name).is_file():
            return str(Path(model_dir) / name)
    return None


def no_chat_template(spec, flag: str | None = "--chat",
                     fix: str = "run without --chat") -> UsageError:
    """The one error for a model without a chat template (`flag` names what asked for one)."""
    return UsageError(
        f"{flag + ': ' if flag else ''}{spec} has no chat template (chat_template.jinja or "
        f"tokenizer_config.json's chat_template, in it or its fine-tuning base); {fix}"
    )


def chat_template_for(spec, run: Path, cfg):
    """The ChatTemplate of a run or model directory: its own, else its fine-tuning base's;
    None when neither has one."""
    from plinth.data.sft import ChatTemplate

    dirs = [run]
    if cfg.finetune.base is not None:
        dirs.append(resolve(str(cfg.finetune.base), "finetune.base"))
    for d in dirs:
        source = chat_template_source("auto", d)
        if source is not None:
            return ChatTemplate(source, token_text(d, "bos_token"), token_text(d, "eos_token"),
                                origin=str(chat_template_origin("auto", d)))
    return None


# ------------------------------------------------------------------------------- load_model


@dataclass
class LoadedModel:
    """A model ready to use, and what it came with."""

    model: nn.Module  # in eval mode, on the requested device
    tokenizer: object  # tokenizers.Tokenizer
    cfg: object  # plinth Config
    run_dir: Path  # the directory holding config.yaml (a run or an import)
    weights: str  # the file or checkpoint directory the weights were read from
    step: int | None  # the checkpoint's step (None for an imported model)
    spec: str = ""  # the model argument as given
    is_run: bool = False  # a training run or checkpoint (not an import)
    eos_ids: list[int] = field(default_factory=list)
    chat_template: object | None = None  # ChatTemplate, or None when the model has none

    @property
    def name(self) -> str:
        return display_name(self.spec)


def load_model(spec: str | Path, device: str = "cpu", *, resolve_spec: bool = True,
               chat: bool = True) -> LoadedModel:
    """Resolve `spec` (see the module doc) and load it: weights, tokenizer, config, eos ids and
    chat template (chat=False skips the template, which may resolve a fine-tune's base)."""
    from tokenizers import Tokenizer

    from plinth.config.load import load_config
    from plinth.models import build_model

    path = resolve(spec) if resolve_spec else Path(spec)
    run, explicit = find_run(path)
    cfg = load_config([run / "config.yaml"]).config
    if cfg.finetune.base is not None and explicit != run:  # a fine-tune: method + heads first
        model = build_finetune_model(cfg, None)
    else:
        model = build_model(cfg.model)
    weights, step = load_weights_into(model, path)
    model.to(torch.device(device)).eval()
    tok_path = run / "tokenizer.json"
    if not tok_path.is_file():
        raise UsageError(f"{run} has no tokenizer.json; was it written by an older plinth?")
    tok = Tokenizer.from_file(str(tok_path))
    return LoadedModel(
        model=model, tokenizer=tok, cfg=cfg, run_dir=run, weights=weights, step=step,
        spec=str(spec), is_run=explicit != run, eos_ids=eos_ids(run, tok, cfg),
        chat_template=chat_template_for(spec, run, cfg) if chat else None,
    )
