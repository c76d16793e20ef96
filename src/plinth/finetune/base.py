"""The pretrained model a fine-tune starts from (`finetune.base`).

A base is a plinth run or checkpoint directory, a directory written by `plinth import`, a
Hugging Face model directory or GGUF file (imported on first use), or a reference model by name
(`ref-smollm2`, `ref-minilm`). Imports land in `$PLINTH_HOME/models` (default
~/.cache/plinth/models), keyed by source, and are reused.

The base decides the architecture and the tokenizer: `base_defaults` turns its config into the
lowest config layer of the fine-tune ("base model DIR" in `plinth config show`), so the run's own
config.yaml holds the whole model and resumes/loads without the base.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from plinth.errors import UsageError

# model keys a fine-tune may change; everything else must match the base's weights
CHANGEABLE = ("model.dropout", "model.max_seq_len")


def models_home() -> Path:
    return Path(os.environ.get("PLINTH_HOME", "~/.cache/plinth")).expanduser() / "models"


def resolve_base(base: str) -> Path:
    """Directory holding the base's config.yaml (a run, checkpoint's run, or imported model)."""
    from plinth.hf.convert import REFERENCES, reference_path
    from plinth.recipes.generate import find_run

    if base in REFERENCES:
        return _imported(reference_path(base), models_home() / base)
    p = Path(base).expanduser()
    if not p.exists():
        raise UsageError(
            f"finetune.base={base}: no such file or directory. Give a plinth run or checkpoint "
            "directory, a `plinth import` output, a Hugging Face model directory (config.json + "
            f"weights), a .gguf file, or a reference model: {', '.join(REFERENCES)}."
        )
    hf_dir = (p / "config.json").is_file() and not (p / "config.yaml").is_file()
    if (p.is_file() and p.suffix == ".gguf") or hf_dir:
        key = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]
        return _imported(p, models_home() / f"{p.stem or p.name}-{key}")
    find_run(p)  # a clear error for anything else
    return p


def _imported(source: Path, out: Path) -> Path:
    from plinth.hf.convert import import_model

    if (out / "import.json").is_file():
        return out
    print(f"importing {source} into {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(import_model(source, out))


def base_defaults(base_dir: Path) -> dict:
    """Flat config values the base fixes: the whole model section and the tokenizer's special
    tokens (what ids mean)."""
    from plinth.config.load import load_config

    cfg = load_config([base_dir / "config.yaml"]).config
    values = {f"model.{k}": v for k, v in cfg.model.model_dump(mode="json").items()}
    values["data.tokenizer.special_tokens"] = list(cfg.data.tokenizer.special_tokens)
    return values


def check_architecture(resolved, defaults: dict, base_dir: Path) -> None:
    """Model keys a user layer changed away from the base's (only CHANGEABLE ones may)."""
    from plinth.config.load import get_value

    changed = [
        (k, v, get_value(resolved.config, k))
        for k, v in defaults.items()
        if k.startswith("model.") and k not in CHANGEABLE
        and get_value(resolved.config, k) != v
    ]
    if changed:
        k, want, got = changed[0]
        raise UsageError(
            f"{k}={got!r} (from {resolved.source(k)}) differs from the base model's {want!r} "
            f"({base_dir / 'config.yaml'}): a fine-tune keeps the base's architecture, or its "
            f"weights would not fit. Remove {k} from the config; only "
            f"{', '.join(CHANGEABLE)} may change."
        )
    if resolved.config.model.max_seq_len > defaults["model.max_seq_len"]:
        raise UsageError(
            f"model.max_seq_len={resolved.config.model.max_seq_len} is longer than the base "
            f"model's {defaults['model.max_seq_len']}; positions beyond it were never trained "
            "(learned position tables have no rows for them). Lower it."
        )


def load_base_weights(model: nn.Module, base_dir: Path) -> str:
    """Load the base's weights into a freshly built model; returns where they came from."""
    from safetensors.torch import load_file

    from plinth.recipes.generate import find_run
    from plinth.train import state as ckpt

    run, explicit = find_run(base_dir)
    if explicit == run:  # imported: plain weights
        ckpt.load_weights(model, load_file(str(run / ckpt.MODEL_FILE)))
        return str(run / ckpt.MODEL_FILE)
    loaded = ckpt.load_checkpoint(explicit) if explicit else ckpt.load_latest(run / "checkpoints")
    loaded.load_into(model)
    return str(loaded.path)


def base_info(base_dir: Path) -> dict:
    """What the manifest records about the base: path, and its import record if any."""
    import json

    info: dict = {"dir": str(base_dir.resolve())}
    rec = base_dir / "import.json"
    if rec.is_file():
        data = json.loads(rec.read_text())
        keep = ("source", "family", "fingerprint", "params", "special_tokens")
        info.update({k: data.get(k) for k in keep})
    return info


def chat_template_source(setting: str, base_dir: Path) -> str | None:
    """The Jinja2 chat template text `finetune.chat_template` selects (None: plain layout)."""
    import json

    if setting == "none":
        return None
    if setting != "auto":
        p = Path(setting).expanduser()
        if not p.is_file():
            raise UsageError(
                f"finetune.chat_template={setting}: no such file. Give a Jinja2 template file, "
                "`auto` (the base model's own, when it has one) or `none` (plain layout)."
            )
        return p.read_text(encoding="utf-8")
    jinja = base_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc = base_dir / "tokenizer_config.json"
    if tc.is_file():
        tpl = json.loads(tc.read_text()).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    return None


def seeded_head(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """A task head initialised from its own seed (independent of how many heads exist)."""
    head = nn.Linear(in_features, out_features)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
        head.bias.zero_()
    return head


def merged_base(model: nn.Module, cfg) -> nn.Module:
    """A fine-tuned model as a plain model of the base architecture: LoRA/DoRA/IA3 folded into
    the weights, task heads left out (they stay in the run's checkpoints). What `plinth export`
    writes. Methods that add computation a plain model cannot hold are refused."""
    from plinth.models import build_model
    from plinth.peft.apply import merge

    method = getattr(model, "peft_method", None)
    heads = getattr(model, "heads", None)
    if method in (None, "full") and heads is None:
        return model
    if method in ("adapter", "prefix", "qlora"):
        why = {
            "adapter": "bottleneck adapters add layers",
            "prefix": "prefixes add key/value positions",
            "qlora": "its base weights are 4-bit",
        }[method]
        raise UsageError(
            f"this run was fine-tuned with finetune.method={method}, which cannot be folded into "
            f"a plain model ({why}). Export the base and ship the run's adapter/ directory next "
            "to it (peft and plinth load it), or fine-tune with lora, dora, ia3 or full."
        )
    if method not in (None, "full"):
        merge(model)
    plain = build_model(cfg.model)
    state = model.state_dict()
    plain.load_state_dict({k: state[k] for k in plain.state_dict()})
    if heads is not None:
        print(f"note: task heads ({', '.join(heads)}) are not part of the base architecture; "
              "they stay in the run's checkpoints")
    return plain.eval()


def chat_template_for(spec: str, run: Path, cfg):
    """The ChatTemplate of a run or model directory: its own, else its fine-tuning base's
    (UsageError naming `spec` when neither has one)."""
    from plinth.data.sft import ChatTemplate

    dirs = [run]
    if cfg.finetune.base is not None:
        dirs.append(resolve_base(str(cfg.finetune.base)))
    for d in dirs:
        source = chat_template_source("auto", d)
        if source is not None:
            return ChatTemplate(source, token_text(d, "bos_token"), token_text(d, "eos_token"))
    raise UsageError(
        f"--chat: {spec} has no chat template (chat_template.jinja or tokenizer_config.json's "
        "chat_template); run without --chat"
    )


def token_text(model_dir: Path, key: str) -> str:
    """A special token's text from tokenizer_config.json (`bos_token`, `eos_token`; a string or
    an AddedToken dict), "" when absent."""
    import json

    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        v = json.loads(tc.read_text()).get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            return v
    return ""
