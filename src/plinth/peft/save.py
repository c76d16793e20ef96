"""Adapters saved alone (kilobytes to megabytes, not the model), in the PEFT library's layout.

    python -c "from plinth.peft.save import to_hf_name; print(to_hf_name('layers.0.attn.q_proj'))"

    out/adapter_config.json          peft's LoraConfig / IA3Config fields, plus
                                     plinth_base_fingerprint (plinth.peft.base_fingerprint)
    out/adapter_model.safetensors    base_model.model.<HF module name>.lora_A.weight, ...

LoRA, DoRA, QLoRA (saved as the LoRA it trains) and IA3 adapters of Llama-family decoders load
with `peft.PeftModel.from_pretrained(hf_model, out)`, and adapters saved by peft load back into
plinth (`load_adapter`), rank and alpha patterns included. Bottleneck adapters and prefixes have
no peft equivalent (peft's prefix tuning shifts token positions), nor do models outside the
Llama family yet: those are saved in the same two files with plinth's own names and a
`plinth_method` key instead of `peft_type`, and only plinth loads them.

Loading checks the base-model fingerprint recorded at save time against the model it goes onto
and refuses a different base. (peft warns that it ignores the extra key; that is expected.)

The plinth <-> Hugging Face module names here are a minimal Llama-family map of their own
(`layers.i.attn.q_proj` <-> `model.layers.i.self_attn.q_proj`, ...), until `plinth.hf`'s
per-family maps land.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from plinth.config.schema import FinetuneConfig
from plinth.errors import NotSupportedError, UsageError
from plinth.models import Decoder, unwrap
from plinth.peft.apply import (
    Summary,
    apply_method,
    base_fingerprint,
    compact_names,
    count_parameters,
)
from plinth.peft.ia3 import IA3Linear
from plinth.peft.lora import LoRALinear
from plinth.peft.wrap import adapter_parameters

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix in front of the wrapped model's own names
FINGERPRINT = "plinth_base_fingerprint"

_HF_LAYER = re.compile(r"layers\.(\d+)\.(attn|mlp)\.(\w+)")
_PLINTH_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


def to_hf_name(name: str) -> str:
    """A plinth Llama-family linear layer's name as Hugging Face's LlamaForCausalLM calls it."""
    if name == "lm_head":
        return name
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        raise NotSupportedError(f"no Hugging Face name for plinth layer {name!r}")
    i, part, leaf = m.groups()
    return f"model.layers.{i}.{'self_attn' if part == 'attn' else 'mlp'}.{leaf}"


def from_hf_name(name: str) -> str:
    """The inverse of `to_hf_name`."""
    if name == "lm_head":
        return name
    m = _PLINTH_LAYER.fullmatch(name)
    if m is None:
        raise UsageError(
            f"the adapter names module {name!r}, which has no plinth counterpart (plinth reads "
            "Llama-family names: model.layers.N.self_attn.q_proj, model.layers.N.mlp.up_proj, "
            "lm_head). Was the adapter trained on another model family?"
        )
    i, part, leaf = m.groups()
    return f"layers.{i}.{'attn' if part == 'self_attn' else 'mlp'}.{leaf}"


# ----------------------------------------------------------------------------------------- save


def save_adapter(
    model: nn.Module, out: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write the model's adapter (not the base) to directory `out`; returns it."""
    model = unwrap(model)
    out = Path(out)
    params = adapter_parameters(model)
    if not params:
        raise UsageError(
            "the model has no adapter to save (finetune.method=full trains the weights "
            "themselves): save a checkpoint of the whole model instead."
        )
    layers = {n: m for n, m in model.named_modules() if getattr(m, "adapter_names", ())}
    lora = {n: m for n, m in layers.items() if isinstance(m, LoRALinear)}
    ia3 = {n: m for n, m in layers.items() if isinstance(m, IA3Linear)}
    kinds = {type(m) for m in layers.values()}
    peft_ok = isinstance(model, Decoder) and len(kinds) == 1 and _llama_names(layers)
    common = {
        "base_model_name_or_path": base_model_name_or_path,
        FINGERPRINT: base_fingerprint(model),
    }
    if peft_ok and lora:
        config, tensors = _lora_to_peft(lora), {}
        for name, m in lora.items():
            key = PREFIX + to_hf_name(name)
            tensors[f"{key}.lora_A.weight"] = m.lora_A.weight
            tensors[f"{key}.lora_B.weight"] = m.lora_B.weight
            if m.dora:
                tensors[f"{key}.lora_magnitude_vector"] = m.lora_magnitude_vector
    elif peft_ok and ia3:
        ff = sorted({n.rsplit(".", 1)[-1] for n, m in ia3.items() if m.feedforward})
        config = {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ia3}),
            "feedforward_modules": ff,
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "modules_to_save": None,
            "inference_mode": True,
        }
        tensors = {  # peft's shapes: (1, in) scales the input, (out, 1) the output
            f"{PREFIX}{to_hf_name(n)}.ia3_l": m.ia3_l[None] if m.feedforward else m.ia3_l[:, None]
            for n, m in ia3.items()
        }
    else:
        config, tensors = _native_config(model, layers), dict(params)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_FILE)
    )
    (out / CONFIG_FILE).write_text(json.dumps({**config, **common}, indent=2) + "\n")
    return out


def _llama_names(layers: dict[str, nn.Module]) -> bool:
    try:
        for n in layers:
            to_hf_name(n)
    except NotSupportedError:
        return False
    return True


def _lora_to_peft(lora: dict[str, LoRALinear]) -> dict:
    kinds = {(m.rank, m.alpha, m.dora, _rslora(m)) for m in lora.values()}
    if len({k[2:] for k in kinds}) > 1:
        raise NotSupportedError(
            "the model mixes LoRA and DoRA (or rsLoRA and plain) layers, which one peft adapter "
            "cannot express; save them as separate adapters."
        )
    ranks = [m.rank for m in lora.values()]
    r = max(set(ranks), key=ranks.count)
    alphas = [m.alpha for m in lora.values()]
    alpha = max(set(alphas), key=alphas.count)
    first = next(iter(lora.values()))
    drop = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    leaves = sorted({n.rsplit(".", 1)[-1] for n in lora})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": drop,
        "use_dora": first.dora,
        "use_rslora": _rslora(first),
        # exact module names: a pattern in plinth may pick a subset of what a suffix would
        "target_modules": sorted(to_hf_name(n) for n in lora) if len(lora) < 64 else leaves,
        "rank_pattern": {to_hf_name(n): m.rank for n, m in lora.items() if m.rank != r},
        "alpha_pattern": {to_hf_name(n): m.alpha for n, m in lora.items() if m.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _rslora(m: LoRALinear) -> bool:
    return abs(m.scaling - m.alpha / m.rank) > 1e-12 * m.scaling


def _native_config(model: nn.Module, layers: dict[str, nn.Module]) -> dict:
    method = getattr(model, "peft_method", None)
    if method is None:
        raise NotSupportedError(
            "this adapter can only be saved in plinth's own layout, which records the "
            "finetune settings that apply_method used; apply the method with apply_method."
        )
    return {"plinth_method": method, **model.peft_settings, "plinth_modules": sorted(layers)}


# ----------------------------------------------------------------------------------------- load


def load_adapter(model: nn.Module, path: str | Path, *, check_base: bool = True) -> Summary:
    """Put the adapter saved in directory `path` (by plinth or by peft) onto `model`.

    The model is the base the adapter was trained on (its fingerprint is checked), plain or
    already carrying the same method (then only the adapter's values are replaced). Afterwards
    the base is frozen and the adapter trains, as after `apply_method`."""
    model = unwrap(model)
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UsageError(
            f"{path} is not an adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(written by plinth.peft.save_adapter or peft's save_pretrained)."
        )
    config = json.loads((path / CONFIG_FILE).read_text())
    expected = config.get(FINGERPRINT)
    if check_base and expected is not None:
        got = base_fingerprint(model)
        if got != expected:
            base = config.get("base_model_name_or_path") or "(not recorded)"
            raise UsageError(
                f"the adapter in {path} was trained on a different base model: its "
                f"{FINGERPRINT} is {expected[:16]}..., this model's is {got[:16]}... (base "
                f"recorded in the adapter: {base}). Load it onto the base model it was trained "
                "on (same weights; fp32 or bf16 copies both match), or train a new adapter for "
                "this one."
            )
    tensors = load_file(str(path / WEIGHTS_FILE))
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        modules = _load_lora(model, config, tensors, path)
    elif peft_type == "IA3":
        modules = _load_ia3(model, tensors, path)
    elif "plinth_method" in config:
        modules = _load_native(model, config, tensors, path)
    else:
        raise NotSupportedError(
            f"{path} holds a {peft_type or 'unknown'} adapter; plinth loads peft's LORA "
            "(incl. DoRA) and IA3 adapters, and its own adapter/prefix ones."
        )
    adapters = {id(p) for p in adapter_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    if getattr(model, "peft_method", None) is None:
        model.peft_base_fingerprint = expected or base_fingerprint(model)
        model.peft_method = config.get("plinth_method") or (
            "ia3" if peft_type == "IA3" else "dora" if config.get("use_dora") else "lora"
        )
    trainable, total = count_parameters(model)
    return Summary(model.peft_method, trainable, total, modules)


def _by_module(tensors: dict[str, torch.Tensor], parts: tuple[str, ...], path: Path) -> dict:
    """{plinth module name: {part: tensor}} from peft keys `PREFIX<hf name>.<part>`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        part = next((p for p in parts if key.endswith("." + p)), None)
        if not key.startswith(PREFIX) or part is None:
            raise NotSupportedError(
                f"{path / WEIGHTS_FILE} holds {key!r}, which plinth does not load (expected "
                f"{PREFIX}<module>.{{{', '.join(parts)}}}: peft adapters without trained "
                "biases, modules_to_save or token adapters)."
            )
        hf = key[len(PREFIX) : -len(part) - 1]
        out.setdefault(from_hf_name(hf), {})[part] = t
    return out


def _load_lora(model: nn.Module, config: dict, tensors: dict, path: Path) -> list[str]:
    for key, bad in (
        ("fan_in_fan_out", True), ("lora_bias", True), ("modules_to_save", "*"),
        ("trainable_token_indices", "*"), ("target_parameters", "*"),
    ):
        value = config.get(key)
        if value and (bad == "*" or value == bad):
            raise NotSupportedError(
                f"{path / CONFIG_FILE} sets {key}={value!r}, which plinth's LoRA does not "
                "support; save the adapter without it."
            )
    if config.get("bias", "none") != "none":
        raise NotSupportedError(
            f"{path / CONFIG_FILE} trains the base biases (bias={config['bias']!r}); plinth "
            "loads LoRA adapters with bias='none' only."
        )
    parts = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    groups = _by_module(tensors, parts, path)
    alpha_pattern = config.get("alpha_pattern") or {}
    dora, rslora = bool(config.get("use_dora")), bool(config.get("use_rslora"))
    for name, t in groups.items():
        if "lora_A.weight" not in t or "lora_B.weight" not in t:
            raise UsageError(f"{path / WEIGHTS_FILE}: {name} lacks lora_A or lora_B")
        rank = t["lora_A.weight"].shape[0]
        hf = to_hf_name(name)
        alpha = float(config.get("lora_alpha", 8))
        for pat, a in alpha_pattern.items():  # peft's rule: the first pattern matching a suffix
            if re.match(rf"(.*\.)?({pat})$", hf):
                alpha = float(a)
                break
        scaling = alpha / rank**0.5 if rslora else alpha / rank
        layer = _module(model, name, path)
        if not isinstance(layer, LoRALinear):
            if type(layer) is not nn.Linear:
                raise UsageError(f"{name} already carries another method ({type(layer).__name__})")
            layer = LoRALinear(layer, rank, alpha, float(config.get("lora_dropout", 0.0)),
                               dora=dora, scaling=scaling)
            _replace(model, name, layer)
        if layer.rank != rank or layer.dora != dora:
            raise UsageError(
                f"{name} carries LoRA of rank {layer.rank} (dora={layer.dora}); the adapter has "
                f"rank {rank} (dora={dora}). Load it onto the plain base model."
            )
        layer.scaling, layer.alpha = scaling, alpha
        _copy(layer.lora_A.weight, t["lora_A.weight"], name, path)
        _copy(layer.lora_B.weight, t["lora_B.weight"], name, path)
        if dora:
            _copy(layer.lora_magnitude_vector, t["lora_magnitude_vector"], name, path)
    return sorted(groups)


def _load_ia3(model: nn.Module, tensors: dict, path: Path) -> list[str]:
    groups = _by_module(tensors, ("ia3_l",), path)
    for name, t in groups.items():
        v = t["ia3_l"]
        layer = _module(model, name, path)
        feedforward = v.shape[0] == 1 and v.shape[-1] != 1
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(layer, feedforward=feedforward)
            _replace(model, name, layer)
        _copy(layer.ia3_l, v.reshape(-1), name, path)
    return sorted(groups)


def _load_native(model: nn.Module, config: dict, tensors: dict, path: Path) -> list[str]:
    method = config["plinth_method"]
    if getattr(model, "peft_method", None) is None:
        fields = set(FinetuneConfig.model_fields) - {"method"}
        apply_method(
            model, FinetuneConfig(method=method, **{k: v for k, v in config.items() if k in fields})
        )
    elif model.peft_method != method:
        raise UsageError(
            f"the adapter in {path} is a {method} adapter; this model already carries "
            f"{model.peft_method}. Load it onto the plain base model."
        )
    params = adapter_parameters(model)
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise UsageError(
            f"{path / WEIGHTS_FILE} holds {compact_names(missing)[:4]}, which this model's "
            f"{model.peft_method} layers do not have. Load it onto the plain base model it was "
            "trained on."
        )
    for name, t in tensors.items():
        _copy(params[name], t, name, path)
    return sorted(config.get("plinth_modules", []))


def _module(model: nn.Module, name: str, path: Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UsageError(
            f"the adapter in {path} adapts {name}, which this model does not have. Is it the "
            "base model the adapter was trained on (same number of layers)?"
        ) from None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, path: Path) -> None:
    if dst.shape != src.shape:
        raise UsageError(
            f"{path / WEIGHTS_FILE}: {name} has shape {tuple(src.shape)} where the model needs "
            f"{tuple(dst.shape)}. Was the adapter trained on a model of another size?"
        )
    dst.copy_(src.to(dst.dtype))
