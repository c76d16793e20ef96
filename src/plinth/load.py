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
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from plinth.config.bases import import_dir, models_home, no_such_model
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
        raise no_such_model(key, spec)
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
    run, explicit = find_run(model_dir)
    return _load_weights(model, run, explicit, None if explicit == run else find_checkpoint(
        run, explicit))


def find_checkpoint(run: Path, explicit: Path | None):
    """The checkpoint a run or checkpoint argument names (train.state.Loaded): `explicit` as
    is (UsageError naming a file that does not load), else the run's newest good one; when
    newer ones are broken, stderr says which were skipped and why."""
    from plinth.train import state as ckpt

    if explicit is not None:
        return ckpt.load_checkpoint(explicit)
    loaded = ckpt.load_latest(run / "checkpoints")
    for path, why in loaded.skipped:
        print(f"warning: skipping checkpoint {path.name} ({why}); using {loaded.path.name}",
              file=sys.stderr)
    return loaded


def check_base_weights(base_dir: Path) -> None:
    """Refuse, before anything is written, a fine-tuning base whose weights do not load: a
    file that does not deserialize (UsageError naming it), or a run that stores only adapter
    weights. Loading itself reports a fallback past broken newer checkpoints."""
    from plinth.train import state as ckpt

    run, explicit = find_run(base_dir)
    if explicit == run:
        try:
            from safetensors import safe_open

            with safe_open(str(run / ckpt.MODEL_FILE), "pt") as f:
                list(f.keys())
        except Exception as e:
            raise UsageError(
                f"finetune.base: {run / ckpt.MODEL_FILE} does not deserialize "
                f"({type(e).__name__}: {str(e)[:160]}). Import the model again with `plinth "
                "import` (or delete the directory to re-import it)."
            ) from None
        return
    if explicit is not None:
        loaded = ckpt.load_checkpoint(explicit)
    else:
        loaded = ckpt.load_latest(run / "checkpoints")
    method = (loaded.base or {}).get("method", "adapter")
    if loaded.base is not None and method not in MERGEABLE:
        raise UsageError(
            f"finetune.base: {loaded.path} holds only the trained {method} weights of a "
            f"fine-tune of {loaded.base.get('name')!r}, and {method} cannot be folded into "
            "plain weights, so it cannot be a base. Use that run's own base, or fine-tune it "
            "with lora, dora, ia3 or full first."
        )


def _load_weights(model: nn.Module, run: Path, explicit: Path | None, loaded):
    from plinth.train import state as ckpt

    if loaded is None:  # an imported model: plain weights, no training state
        f = run / ckpt.MODEL_FILE
        try:
            from safetensors.torch import load_file

            weights = load_file(str(f))
        except Exception as e:  # SafetensorError: a bad header, data past the end
            raise UsageError(
                f"{f} does not deserialize ({type(e).__name__}: {str(e)[:160]}). Import the "
                "model again with `plinth import` (or delete the directory to re-import it)."
            ) from None
        ckpt.load_weights(model, weights)
        return str(f), None
    if loaded.base is not None and not hasattr(model, "peft_method"):
        # a parameter-efficient fine-tune as the base of another (SFT, then DPO): its own base
        # with the adapter folded in
        _load_merged(model, run, loaded)
    else:
        loaded.load_into(model)  # single file, or a sharded (DCP) checkpoint consolidated here
    step = loaded.meta.get("step")
    return str(loaded.path), int(step) if step is not None else None


MERGEABLE = ("lora", "dora", "ia3")  # methods whose trained weights fold into the base's


def _load_merged(model: nn.Module, run: Path, loaded) -> None:
    """Weights of a LoRA/DoRA/IA3 fine-tune merged into its base, into a plain `model`."""
    from plinth.config.load import load_config
    from plinth.peft.apply import merge

    cfg = load_config([run / "config.yaml"]).config
    tuned = build_finetune_model(cfg, finetune_base_dir(cfg, loaded.base))
    loaded.load_into(tuned)
    merge(tuned)
    state = tuned.state_dict()
    model.load_state_dict({k: state[k] for k in model.state_dict()})


def finetune_base_dir(cfg, recorded: dict | None) -> Path:
    """The base to rebuild a parameter-efficient fine-tune from: the recorded directory when it
    is still there, else the config's finetune.base resolved (loading checks the fingerprint)."""
    recorded = recorded or {}
    if recorded.get("dir") and (Path(recorded["dir"]) / "config.yaml").is_file():
        return Path(recorded["dir"])
    try:
        return resolve(str(cfg.finetune.base), "finetune.base")
    except UsageError as e:
        fp = recorded.get("fingerprint")
        raise UsageError(
            f"this {cfg.finetune.method} fine-tune stores only its trained weights; rebuilding "
            f"it needs its base {cfg.finetune.base!r}"
            + (f" (recorded at {recorded['dir']}" if recorded.get("dir") else " (")
            + (f", fingerprint {fp})" if fp else ")")
            + f", which is not found: {e}"
        ) from None


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


def read_tokenizer(model_dir: Path):
    """tokenizers.Tokenizer from a model or run directory's tokenizer.json (UsageError naming
    the file when it is missing or does not load)."""
    from tokenizers import Tokenizer

    f = Path(model_dir) / "tokenizer.json"
    if not f.is_file():
        raise UsageError(f"{model_dir} has no tokenizer.json; was it written by an older plinth?")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise UsageError(
            f"{f} is not a tokenizer file ({str(e).splitlines()[0][:160] if str(e) else e!r}). "
            "Restore it from the model it came from (or re-import the model)."
        ) from None


def read_json(f: Path) -> dict:
    """A JSON object from a model directory's record (import.json, manifest.json,
    tokenizer_config.json); UsageError naming the file when it is not one."""
    try:
        data = json.loads(Path(f).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UsageError(
            f"{f} cannot be read as JSON ({type(e).__name__}). Restore it from the model or run "
            "it came from (or re-import the model)."
        ) from None
    if not isinstance(data, dict):
        raise UsageError(
            f"{f} is valid JSON but a {type(data).__name__}, not an object: not the record "
            "plinth wrote. Restore it from the model or run it came from."
        )
    return data


def token_text(model_dir: Path, key: str) -> str:
    """A special token's text from tokenizer_config.json (`bos_token`, `eos_token`; a string or
    an AddedToken dict), "" when absent."""
    tc = Path(model_dir) / TOKENIZER_CONFIG
    if tc.is_file():
        v = read_json(tc).get(key)
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
        names = read_json(rec).get("special_tokens", {})
    elif manifest.is_file():  # a fine-tune run being resumed: its base's roles
        base = read_json(manifest).get("base")
        names = (base.get("special_tokens") if isinstance(base, dict) else None) or names
    out = {}
    for role, text in (names.items() if isinstance(names, dict) else ()):
        if not isinstance(text, str):
            continue
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
    tokens = read_json(rec).get("special_tokens")
    eos = tokens.get("eos") if isinstance(tokens, dict) else None
    return eos if isinstance(eos, str) else None


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
    from plinth.config.load import load_config
    from plinth.models import build_model

    path = resolve(spec) if resolve_spec else Path(spec)
    run, explicit = find_run(path)
    cfg = load_config([run / "config.yaml"]).config
    loaded = None if explicit == run else find_checkpoint(run, explicit)
    if cfg.finetune.base is not None and explicit != run:  # a fine-tune: method + heads first
        # a parameter-efficient checkpoint holds the trained weights only: base from its record
        base = None if loaded.base is None else finetune_base_dir(cfg, loaded.base)
        model = build_finetune_model(cfg, base)
    else:
        model = build_model(cfg.model)
    weights, step = _load_weights(model, run, explicit, loaded)
    model.to(torch.device(device)).eval()
    tok = read_tokenizer(run)
    return LoadedModel(
        model=model, tokenizer=tok, cfg=cfg, run_dir=run, weights=weights, step=step,
        spec=str(spec), is_run=explicit != run, eos_ids=eos_ids(run, tok, cfg),
        chat_template=chat_template_for(spec, run, cfg) if chat else None,
    )
