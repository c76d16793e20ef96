"""plinth models to Hugging Face model directories: config.json of the matching family, the
weights under Hugging Face names, the tokenizer files.

    plinth export models/smollm2 hf/smollm2 --format hf

`export_hf` takes a model already loaded (plinth.load) with a fine-tune's adapters folded in
(plinth.finetune.base.merged_base); the `plinth export` recipe (plinth.recipes.convert) does
both. A model imported by `plinth import` (or fine-tuned from one) exports on top of its original
config.json and with the tensors it kept aside (plinth.hf.layout), so the round trip gives back
the same checkpoint; a plinth-native model exports as the family its config fits.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from plinth.config.schema import Config
from plinth.errors import UsageError
from plinth.hf.families import Family, families_for_config
from plinth.hf.layout import (
    EXTRA_FILE,
    HF_CONFIG_FILE,
    IMPORT_FILE,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    check_out,
    staged,
)
from plinth.track.files import save_safetensors

# config.json keys that describe one file or one library version, not the model
_TRANSIENT = ("_name_or_path", "transformers_version", "quantization_config", "torch_dtype",
              "dtype", "architectures", "auto_map", "layer_types")


# plinth's task heads as transformers classes (written next to an exported head)
MODELING_FILE = "modeling_plinth.py"
_HEAD_CLASSES = {"bert": "Bert", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
                 "qwen3": "Qwen3", "gpt2": "GPT2"}


@dataclass
class ExportHead:
    """A fine-tune's task head, exported with its base as AutoModelForSequenceClassification."""

    task: str  # the head's name in the run (heads.<task>)
    kind: str  # classification | regression
    labels: list[str]  # output names in head order (class names; value names for regression)
    pooling: str  # mean | cls | last (plinth.models.heads.pool)
    weight: torch.Tensor  # (outputs, d_model)
    bias: torch.Tensor  # (outputs,)


def export_hf(net: torch.nn.Module, cfg: Config, run: Path, out: str | Path,
              force: bool = False, head: ExportHead | None = None,
              base_dir: Path | None = None) -> Path:
    """Write `net` (a plain model of `cfg.model`'s architecture, loaded from run directory
    `run`, adapters already folded in) as a Hugging Face model directory `out`; with `head`,
    as a sequence classifier (see modeling_plinth.py). `base_dir`: the fine-tune's base,
    resolved (its hf_config.json is the export's base config)."""
    out = Path(out)
    check_out(out, force)
    base = _hf_base_dir(run, cfg, base_dir)
    hf_base = json.loads((base / HF_CONFIG_FILE).read_text()) if base else {}
    info = json.loads((base / IMPORT_FILE).read_text()) if base and (base / IMPORT_FILE).is_file() \
        else {}
    choices = families_for_config(cfg.model)
    if not choices:
        raise UsageError(
            f"{run / 'config.yaml'}: this model has no Hugging Face equivalent. Exportable "
            "shapes: Llama family (decoder, swiglu, rmsnorm, rope, pre-norm; qkv_bias -> qwen2, "
            "qk_norm -> qwen3), GPT-2 (decoder, gelu_tanh, layernorm, learned positions, bias), "
            "BERT (encoder, post-norm, layernorm, learned positions, bias, type_vocab_size > 0, "
            "tied head)."
        )
    family, mt = next(((f, m) for f, m in choices if m == hf_base.get("model_type")), choices[0])
    same = info.get("model_type") == mt
    if hf_base.get("model_type") != mt:
        hf_base = {}  # a config of another type would carry wrong keys
    arch, prefix = family.architectures[mt]
    if same and info.get("architectures"):
        arch, prefix = info["architectures"][0], info.get("prefix", prefix)
    config = {k: v for k, v in hf_base.items() if k not in _TRANSIENT}
    config.update(family.to_hf(cfg.model, mt))
    config.update(model_type=mt, architectures=[arch], dtype="float32")
    if head is not None:  # the base under its *ForSequenceClassification prefix
        prefix = family.prefix
    state = _to_hf_state(net, family, prefix)
    if head is not None:
        config.update(_head_config(mt, head))
        state.pop("lm_head.weight", None)  # a classifier has no language-model head
        name = "classifier" if mt == "bert" else "score"  # transformers' names
        state[f"{name}.weight"] = head.weight.detach().float().cpu().contiguous()
        state[f"{name}.bias"] = head.bias.detach().float().cpu().contiguous()
    elif same and base is not None and (base / EXTRA_FILE).is_file():
        for k, t in load_file(str(base / EXTRA_FILE)).items():
            state.setdefault(k, t)
    with staged(out) as stage:
        save_safetensors(state, str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
        if head is not None:
            shutil.copyfile(Path(__file__).with_name(MODELING_FILE), stage / MODELING_FILE)
        tok_dirs = [d for d in (run, base) if d is not None]
        for name in TOKENIZER_FILES:
            found = next((d / name for d in tok_dirs if (d / name).is_file()), None)
            if found is not None:
                shutil.copyfile(found, stage / name)
        if not (stage / "tokenizer_config.json").is_file():
            _write_tokenizer_config(stage, cfg)
        if not hf_base:
            _special_ids(config, stage, cfg)
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _hf_base_dir(run: Path, cfg: Config, base_dir: Path | None = None) -> Path | None:
    """Where the original Hugging Face config lives: the imported directory itself, or the
    base model a fine-tuning run started from."""
    for d in (run, base_dir, Path(cfg.finetune.base) if cfg.finetune.base else None):
        if d is not None and (d / HF_CONFIG_FILE).is_file():
            return d
    return None


def _head_config(model_type: str, head: ExportHead) -> dict:
    """config.json fields of an exported head: the plinth_<type> classes of modeling_plinth.py
    (found through auto_map), the labels, the problem type and plinth's pooling."""
    name = _HEAD_CLASSES[model_type]
    return dict(
        model_type=f"plinth_{model_type}",
        architectures=[f"Plinth{name}ForSequenceClassification"],
        auto_map={
            "AutoConfig": f"modeling_plinth.Plinth{name}Config",
            "AutoModelForSequenceClassification":
                f"modeling_plinth.Plinth{name}ForSequenceClassification",
        },
        num_labels=len(head.labels),
        id2label={str(i): label for i, label in enumerate(head.labels)},
        label2id={label: i for i, label in enumerate(head.labels)},
        problem_type="regression" if head.kind == "regression"
        else "single_label_classification",
        plinth_pooling=head.pooling,
        plinth_task=head.task,
    )


def _to_hf_state(net: torch.nn.Module, family: Family, prefix: str) -> dict[str, torch.Tensor]:
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    transposed: dict[str, bool] = {}
    for name, p in net.named_parameters():  # a tied head is the embedding: listed once
        try:
            src = family.source(name)
        except KeyError:
            raise UsageError(
                f"parameter {name} has no place in a Hugging Face {family.name} model. Merge "
                "or remove adapters and extra heads before exporting."
            ) from None
        key = src.name if src.head else prefix + src.name
        groups.setdefault(key, []).append((src.part[0] if src.part else 0, p.detach()))
        transposed[key] = src.transpose
    state = {}
    for key, parts in groups.items():
        t = torch.cat([p for _, p in sorted(parts, key=lambda x: x[0])], dim=0)
        state[key] = (t.t() if transposed[key] else t).contiguous().cpu().float()
    return state


def _write_tokenizer_config(stage: Path, cfg: Config) -> None:
    """A minimal tokenizer_config.json so `AutoTokenizer.from_pretrained(OUT)` works."""
    roles = ("eos_token", "pad_token", "mask_token", "bos_token")
    doc = {"tokenizer_class": "PreTrainedTokenizerFast",
           "model_max_length": cfg.model.max_seq_len}
    doc.update(zip(roles, cfg.data.tokenizer.special_tokens, strict=False))
    (stage / "tokenizer_config.json").write_text(json.dumps(doc, indent=2) + "\n")


def _special_ids(config: dict, stage: Path, cfg: Config) -> None:
    from tokenizers import Tokenizer

    if not (stage / "tokenizer.json").is_file():
        return
    tok = Tokenizer.from_file(str(stage / "tokenizer.json"))
    for role, token in zip(("eos", "pad", "mask", "bos"), cfg.data.tokenizer.special_tokens,
                           strict=False):
        tid = tok.token_to_id(token)
        if tid is not None and role != "mask":
            config[f"{role}_token_id"] = tid
