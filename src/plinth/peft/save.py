"""Adapters saved alone (kilobytes to megabytes, not the model), in the PEFT library's layout.

    python -c "from plinth.config.schema import ModelConfig, FinetuneConfig; \
from plinth.models import build_model; from plinth.peft import apply_method, save_adapter; \
m = build_model(ModelConfig(n_layers=2)); apply_method(m, FinetuneConfig(method='lora')); \
print(save_adapter(m, '/tmp/plinth-adapter'))"

    out/adapter_config.json          peft's LoraConfig / IA3Config fields, plus
                                     plinth_base_fingerprint (plinth.hf.fingerprints)
    out/adapter_model.safetensors    base_model.model.<HF module name>.lora_A.weight, ...

LoRA, DoRA, QLoRA (saved as the LoRA it trains) and IA3 adapters of every model that has a
Hugging Face equivalent (the Llama family, GPT-2, BERT: plinth.hf.families' name maps) load with
`peft.PeftModel.from_pretrained(hf_model, out)` on the model `plinth export` writes (or the one
`plinth import` read), and adapters saved by peft load back into plinth (`load_adapter`), rank
and alpha patterns included. Module names are the Hugging Face architecture's:
LlamaForCausalLM `model.layers.N.self_attn.q_proj`, GPT2LMHeadModel `transformer.h.N.attn.c_attn`,
BertModel `encoder.layer.N.attention.self.query`; peft adapters trained on a task model (`bert.`
in front) load too.

GPT-2 computes q, k and v with one Conv1D, `c_attn`, which peft adapts as one module. LoRA on
any of plinth's q_proj/k_proj/v_proj is written exactly as LoRA on c_attn of the summed rank:
lora_A stacks the parts' A, lora_B puts each part's B in its own rows and columns (zeros
elsewhere), and DoRA's magnitude of a part without LoRA is its row norms (its scale stays 1).
Loading splits c_attn's update by rows and keeps each part's non-zero columns, so a round trip
gives back the same layers (a c_attn adapter trained in peft gives q, k and v the full rank).
IA3 scaling c_attn's output is the parts' vectors end to end (ones for a part without IA3).
What peft cannot express (LoRA on BERT's tied MLM head, which BertModel lacks; IA3 scaling the
input of q, k and v, one input in GPT-2, differently) `format="peft"` refuses, naming the modules
and the targets that export; the default `format="auto"` then writes plinth's own layout and
records the reason in adapter_config.json's `plinth_not_peft`.

Bottleneck adapters and prefixes have no peft equivalent (peft's prefix tuning shifts token
positions), nor does a model without a Hugging Face equivalent: those are saved in the same two
files with plinth's own names and a `plinth_method` key instead of `peft_type`, and only plinth
loads them (`format="plinth"` does that for any adapter).

Loading checks the base-model fingerprint recorded at save time against the model it goes onto
and refuses a different base. It is plinth.hf.fingerprints's, the value `plinth import` writes
into import.json, so an adapter trained on an imported model records that directory's
fingerprint. (peft warns that it ignores the extra key; that is expected.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file
from torch import nn

from plinth.config.schema import FinetuneConfig
from plinth.errors import NotSupportedError, UsageError
from plinth.hf.fingerprints import SCHEME, is_current
from plinth.hf.layout import IMPORT_FILE  # read here for the base's fingerprint
from plinth.models import unwrap
from plinth.peft.apply import (
    Summary,
    apply_method,
    base_fingerprint,
    compact_names,
    count_parameters,
)
from plinth.peft.ia3 import IA3Linear
from plinth.peft.lora import LoRALinear
from plinth.peft.names import HFNames, hf_names
from plinth.peft.wrap import adapter_parameters
from plinth.track.files import save_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix in front of the wrapped model's own names
FINGERPRINT = "plinth_base_fingerprint"
FORMATS = ("auto", "peft", "plinth")


# ----------------------------------------------------------------------------------------- save


def save_adapter(
    model: nn.Module,
    out: str | Path,
    base_model_name_or_path: str | None = None,
    *,
    format: str = "auto",
) -> Path:
    """Write the model's adapter (not the base) to directory `out`; returns it.

    format: peft writes peft's layout or refuses, naming what it cannot express and the targets
    that export; plinth writes plinth's own layout (only plinth loads it); auto writes peft's
    layout where it can express the adapter and plinth's otherwise, with the reason in
    adapter_config.json's `plinth_not_peft`. When `base_model_name_or_path` is a directory
    written by `plinth import`, module names carry its checkpoint's prefix (import.json)."""
    if format not in FORMATS:
        raise UsageError(f"save_adapter format={format!r}; use one of {', '.join(FORMATS)}")
    model = unwrap(model)
    out = Path(out)
    params = adapter_parameters(model)
    if not params:
        raise UsageError(
            "the model has no adapter to save (finetune.method=full trains the weights "
            "themselves): save a checkpoint of the whole model instead."
        )
    fp = base_fingerprint(model)
    info = _import_info(base_model_name_or_path)
    layers = {n: m for n, m in model.named_modules() if getattr(m, "adapter_names", ())}
    lora = {n: m for n, m in layers.items() if isinstance(m, LoRALinear)}
    ia3 = {n: m for n, m in layers.items() if isinstance(m, IA3Linear)}
    names = hf_names(model)
    if info and names and info.get("family") == names.family.name and "prefix" in info:
        names = hf_names(model, info["prefix"])  # the imported checkpoint's own module names
    config = None
    if format != "plinth":
        try:
            config, tensors = _to_peft(model, layers, lora, ia3, names)
        except NotSupportedError as e:
            if format == "peft":
                raise
            why = str(e)
    if config is None:
        config, tensors = _native_config(model, layers), dict(params)
        if format == "auto":
            config["plinth_not_peft"] = why  # why peft's layout could not hold it
    common = {"base_model_name_or_path": base_model_name_or_path, FINGERPRINT: fp}
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_FILE)
    )
    (out / CONFIG_FILE).write_text(json.dumps({**config, **common}, indent=2) + "\n")
    return out


def _to_peft(model: nn.Module, layers: dict, lora: dict, ia3: dict, names: HFNames | None):
    """(adapter_config, tensors) in peft's layout, or NotSupportedError saying why not."""
    method = getattr(model, "peft_method", None) or ("ia3" if ia3 else "lora")
    if len(lora) != len(layers) and len(ia3) != len(layers):
        kinds = sorted({type(m).__name__ for m in layers.values()})
        raise NotSupportedError(
            f"the model's {method} adapter ({', '.join(kinds)}) has no equivalent in peft's "
            "format, which plinth writes for LoRA, DoRA, QLoRA and IA3; save it with "
            "format='plinth' (plinth's own layout, loaded by plinth.peft.load_adapter)."
        )
    if names is None:
        raise NotSupportedError(
            "this model has no Hugging Face equivalent (plinth.hf.families: the Llama family, "
            "GPT-2, BERT), so a peft adapter, which names Hugging Face modules, cannot describe "
            f"its {method} layers; save it with format='plinth'."
        )
    if lora:
        config, tensors = _lora_to_peft(model, lora, names, method)
    else:
        config, tensors = _ia3_to_peft(model, ia3, names)
    config["task_type"] = "CAUSAL_LM" if model.cfg.arch == "decoder" else "FEATURE_EXTRACTION"
    return config, tensors


def _import_info(base: str | Path | None) -> dict | None:
    """import.json of `base` when it is a directory written by `plinth import`."""
    if base is None or not (Path(base) / IMPORT_FILE).is_file():
        return None
    try:
        info = json.loads((Path(base) / IMPORT_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return info if isinstance(info, dict) else None


def _refuse(method: str, names: HFNames, problems: list[str], lora: bool) -> NoReturn:
    ok = compact_names(list(names.places))
    targets = f" Targets that export: {', '.join(ok)} (finetune.target_modules)." if lora else ""
    raise NotSupportedError(
        f"this {method} adapter cannot be saved in peft's format for the Hugging Face "
        f"{names.architecture}: {'; '.join(problems)}.{targets} Or save it in plinth's own "
        "layout, which only plinth loads: save_adapter(model, out, format='plinth')."
    )


def _grouped(layers: dict[str, nn.Module], names: HFNames, method: str, lora: bool) -> dict:
    """HF module -> [(plinth layer, its module in the model)] for every part of a module that
    carries an adapter layer (parts without one included, for fused modules)."""
    homeless = [n for n in layers if names.hf(n) is None]
    if homeless:
        _refuse(method, names, [
            f"{', '.join(compact_names(homeless))} "
            f"{'has' if len(homeless) == 1 else 'have'} no counterpart in "
            f"{names.architecture}"], lora)
    hfs = dict.fromkeys(names.hf(n) for n in layers)
    return {hf: [(n, layers.get(n)) for n, _ in names.parts(hf)] for hf in hfs}


def _mode(values: list):
    return max(dict.fromkeys(values), key=values.count)


def _lora_to_peft(model: nn.Module, lora: dict[str, LoRALinear], names: HFNames, method: str):
    kinds = {(m.dora, _rslora(m)) for m in lora.values()}
    if len(kinds) > 1:
        raise NotSupportedError(
            "the model mixes LoRA and DoRA (or rsLoRA and plain) layers, which one peft adapter "
            "cannot express; save them as separate adapters."
        )
    (dora, rslora), = kinds
    modules: dict[str, tuple] = {}  # HF module -> (rank, alpha, A, B, magnitude)
    for hf, parts in _grouped(lora, names, method, lora=True).items():
        if len(parts) == 1:
            m = parts[0][1]
            modules[hf] = (m.rank, m.alpha, m.lora_A.weight, m.lora_B.weight,
                           m.lora_magnitude_vector)
        else:
            modules[hf] = _fuse(
                [(n, m if m is not None else model.get_submodule(n)) for n, m in parts], rslora
            )
    r = _mode([v[0] for v in modules.values()])
    alpha = _mode([v[1] for v in modules.values()])
    first = next(iter(lora.values()))
    drop = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": drop,
        "use_dora": dora,
        "use_rslora": rslora,
        # exact module names: a suffix could also pick modules plinth has no adapter on
        "target_modules": sorted(modules),
        "rank_pattern": {hf: v[0] for hf, v in modules.items() if v[0] != r},
        "alpha_pattern": {hf: v[1] for hf, v in modules.items() if v[1] != alpha},
        "bias": "none",
        "fan_in_fan_out": any(names.conv1d(hf) for hf in modules),  # GPT-2's Conv1D
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for hf, (_, _, a, b, mag) in modules.items():
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = a
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b
        if dora:
            tensors[f"{PREFIX}{hf}.lora_magnitude_vector"] = mag
    return config, tensors


@torch.no_grad()
def _fuse(parts: list[tuple[str, nn.Module]], rslora: bool) -> tuple:
    """LoRA on some row blocks of one fused module (GPT-2's c_attn) as one LoRA of the summed
    rank: exact, B block-diagonal over the parts that have LoRA."""
    present = [m for _, m in parts if isinstance(m, LoRALinear)]
    s = present[0].scaling
    rank = sum(m.rank for m in present)
    alpha = s * (rank**0.5 if rslora else rank)  # peft's scaling alpha / r is then s
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    ref = present[0].lora_B.weight
    a = torch.cat([m.lora_A.weight for m in present])
    b = ref.new_zeros(sum(m.out_features for _, m in parts), rank)
    mags, row, col = [], 0, 0
    for _, m in parts:
        if isinstance(m, LoRALinear):
            part = m.lora_B.weight if m.scaling == s else m.lora_B.weight * (m.scaling / s)
            b[row : row + m.out_features, col : col + m.rank] = part
            col += m.rank
            mags.append(m.lora_magnitude_vector)
        else:  # no LoRA here: DoRA's magnitude is the row norm, i.e. a scale of 1
            mags.append(m.weight.float().norm(dim=1).to(ref.dtype))
        row += m.out_features
    return rank, alpha, a, b, torch.cat(mags) if present[0].dora else None


def _ia3_to_peft(model: nn.Module, ia3: dict[str, IA3Linear], names: HFNames):
    vectors: dict[str, torch.Tensor] = {}
    feedforward, problems = [], []
    for hf, parts in _grouped(ia3, names, "ia3", lora=False).items():
        present = [m for _, m in parts if m is not None]
        feeds = {m.feedforward for m in present}
        which = ", ".join(n for n, m in parts if m is not None)
        if len(feeds) > 1:
            problems.append(f"{which} mix input and output scaling on the fused {hf}")
            continue
        ff = feeds.pop()
        if ff and len(parts) > 1 and (
            len(present) < len(parts) or any(not torch.equal(m.ia3_l, present[0].ia3_l)
                                             for m in present)):
            problems.append(
                f"{which} scale the input of the fused {hf} (shared by "
                f"{', '.join(n for n, _ in parts)}), which takes one vector for all of them")
            continue
        if ff or len(parts) == 1:
            v = present[0].ia3_l
        else:  # output scaling: the parts' vectors end to end, ones where a part has none
            v = torch.cat([m.ia3_l if m is not None else
                           torch.ones(model.get_submodule(n).out_features,
                                      dtype=present[0].ia3_l.dtype,
                                      device=present[0].ia3_l.device) for n, m in parts])
        vectors[hf] = v[None] if ff else v[:, None]  # peft's shapes: (1, in) and (out, 1)
        if ff:
            feedforward.append(hf)
    if problems:
        _refuse("ia3", names, problems, lora=False)
    config = {
        "peft_type": "IA3",
        "target_modules": sorted(vectors),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": any(names.conv1d(hf) for hf in vectors),
        "init_ia3_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return config, {f"{PREFIX}{hf}.ia3_l": v for hf, v in vectors.items()}


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
    config = _read_config(path / CONFIG_FILE)
    got = base_fingerprint(model)  # before any layer changes
    if check_base:
        _check_base(config, got, path)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # SafetensorError: a bad header, data past the end of the file
        raise UsageError(
            f"{path / WEIGHTS_FILE} does not deserialize ({type(e).__name__}: "
            f"{str(e)[:160]}). Save the adapter again (plinth.peft.save_adapter, peft's "
            "save_pretrained) or use another copy."
        ) from None
    peft_type = config.get("peft_type")
    if peft_type in ("LORA", "IA3"):
        names = hf_names(model)
        if names is None:
            raise UsageError(
                f"{path} holds a peft adapter, which names the modules of a Hugging Face model; "
                "this model has no Hugging Face equivalent (plinth.hf.families: the Llama "
                "family, GPT-2, BERT), so it is not the adapter's base. Load it onto the model "
                "it was trained on (`plinth import` it first)."
            )
        if peft_type == "LORA":
            modules = _load_lora(model, config, tensors, path, names)
        else:
            modules = _load_ia3(model, tensors, path, names)
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
        model.peft_base_fingerprint = got
        model.peft_method = config.get("plinth_method") or (
            "ia3" if peft_type == "IA3" else "dora" if config.get("use_dora") else "lora"
        )
    trainable, total = count_parameters(model)
    return Summary(model.peft_method, trainable, total, modules)


def _read_config(f: Path) -> dict:
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UsageError(
            f"{f} cannot be read as JSON ({type(e).__name__}); save the adapter again."
        ) from None
    if not isinstance(config, dict):
        raise UsageError(
            f"{f} is valid JSON but a {type(config).__name__}, not an adapter config object; "
            "save the adapter again."
        )
    return config


def _check_base(config: dict, got: str, path: Path) -> None:
    expected = config.get(FINGERPRINT)
    if expected is None:  # saved by peft: nothing recorded to check
        return
    if not is_current(expected):
        raise UsageError(
            f"the adapter in {path} records its base model's {FINGERPRINT} in a scheme this "
            f"plinth does not compute ({str(expected)[:24]}..., not {SCHEME}:...), so its base "
            "cannot be checked. If this model is its base, load it with "
            "load_adapter(model, path, check_base=False) and save it again to record the "
            "current fingerprint."
        )
    if got == expected:
        return
    base = config.get("base_model_name_or_path")
    info = _import_info(base)
    if info is not None and info.get("fingerprint") == expected:
        fix = (f"Load it onto {base} (its {IMPORT_FILE} records the adapter's fingerprint), or "
               "train a new adapter for this model.")
    else:
        where = f"recorded in the adapter as {base}" if base else "not recorded in the adapter"
        fix = (f"Load it onto the base model it was trained on ({where}; the same weights in "
               "fp32 or bf16 match), or train a new adapter for this model.")
    raise UsageError(
        f"the adapter in {path} was trained on a different base model: its {FINGERPRINT} is "
        f"{expected}, the model it is being loaded onto has {got} (plinth.peft.base_fingerprint; "
        f"a directory written by `plinth import` records its own in {IMPORT_FILE}). {fix}"
    )


def _by_module(tensors: dict[str, torch.Tensor], parts: tuple[str, ...], path: Path,
               names: HFNames) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{HF module as `names` spells it: (as the adapter spells it, {part: tensor})} from peft
    keys `PREFIX<module>.<part>`."""
    out: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        part = next((p for p in parts if key.endswith("." + p)), None)
        if not key.startswith(PREFIX) or part is None:
            raise NotSupportedError(
                f"{path / WEIGHTS_FILE} holds {key!r}, which plinth does not load (expected "
                f"{PREFIX}<module>.{{{', '.join(parts)}}}: peft adapters without trained "
                "biases, modules_to_save or token adapters)."
            )
        hf = key[len(PREFIX) : -len(part) - 1]
        found = names.find(hf)
        if found is None:
            known = compact_names(names.modules())
            raise UsageError(
                f"the adapter in {path} adapts module {hf!r}, which this {names.family.name} "
                f"model ({names.architecture}) does not have; its adaptable modules are "
                f"{', '.join(known)}. Was the adapter trained on another model family or size?"
            )
        out.setdefault(found, (hf, {}))[1][part] = t
    return out


def _load_lora(model: nn.Module, config: dict, tensors: dict, path: Path,
               names: HFNames) -> list[str]:
    # fan_in_fan_out only says how a Conv1D stores its weight: peft sets it per module type
    for key, bad in (
        ("lora_bias", True), ("modules_to_save", "*"),
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
    groups = _by_module(tensors, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
                        path, names)
    alpha_pattern = config.get("alpha_pattern") or {}
    dora, rslora = bool(config.get("use_dora")), bool(config.get("use_rslora"))
    dropout = float(config.get("lora_dropout", 0.0))
    loaded = []
    for hf, (spelt, t) in groups.items():
        if "lora_A.weight" not in t or "lora_B.weight" not in t:
            raise UsageError(f"{path / WEIGHTS_FILE}: {hf} lacks lora_A or lora_B")
        if dora and "lora_magnitude_vector" not in t:
            raise UsageError(f"{path / WEIGHTS_FILE}: {hf} lacks DoRA's lora_magnitude_vector")
        a, b, mag = t["lora_A.weight"], t["lora_B.weight"], t.get("lora_magnitude_vector")
        rank = a.shape[0]
        alpha = float(config.get("lora_alpha", 8))
        for pat, value in alpha_pattern.items():  # peft's rule: the first pattern matching
            if re.match(rf"(.*\.)?({pat})$", spelt):
                alpha = float(value)
                break
        scaling = alpha / rank**0.5 if rslora else alpha / rank
        parts = names.parts(hf)
        if len(parts) == 1:
            _put_lora(model, parts[0][0], a, b, mag, alpha, scaling, dropout, dora, path)
            loaded.append(parts[0][0])
            continue
        # a fused module (GPT-2's c_attn): each part takes its rows of B and the columns used
        layers = [_module(model, n, path) for n, _ in parts]
        outs = [m.out_features for m in layers]
        if b.shape[0] != sum(outs) or (dora and mag.shape[0] != sum(outs)):
            raise UsageError(
                f"{path / WEIGHTS_FILE}: {hf} has {b.shape[0]} output rows where this model's "
                f"{', '.join(n for n, _ in parts)} have {sum(outs)}. Was the adapter trained "
                "on a model of another size?"
            )
        rows = torch.split(b, outs)
        mags = torch.split(mag, outs) if dora else [None] * len(parts)
        used = [(r != 0).any(0) for r in rows]
        untrained = not any(u.any() for u in used)
        for (name, _), layer, rb, u, m in zip(parts, layers, rows, used, mags, strict=True):
            if untrained:
                u = torch.ones_like(u)
            elif not u.any():
                if not dora or torch.equal(m.float(), _dense(layer).norm(dim=1)):
                    continue  # the update leaves this part as it is
                u = torch.ones_like(u)
            r = int(u.sum())
            part_alpha = scaling * (r**0.5 if rslora else r)
            _put_lora(model, name, a[u], rb[:, u], m, part_alpha, scaling, dropout, dora, path)
            loaded.append(name)
    return sorted(loaded)


def _dense(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, LoRALinear):
        return layer.dense_weight(torch.float32)
    return layer.weight.float()


def _put_lora(model: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor,
              mag: torch.Tensor | None, alpha: float, scaling: float, dropout: float, dora: bool,
              path: Path) -> None:
    rank = a.shape[0]
    layer = _module(model, name, path)
    if not isinstance(layer, LoRALinear):
        if type(layer) is not nn.Linear:
            raise UsageError(f"{name} already carries another method ({type(layer).__name__})")
        layer = LoRALinear(layer, rank, alpha, dropout, dora=dora, scaling=scaling)
        _replace(model, name, layer)
    if layer.rank != rank or layer.dora != dora:
        raise UsageError(
            f"{name} carries LoRA of rank {layer.rank} (dora={layer.dora}); the adapter has "
            f"rank {rank} (dora={dora}). Load it onto the plain base model."
        )
    layer.scaling, layer.alpha = scaling, alpha
    _copy(layer.lora_A.weight, a, name, path)
    _copy(layer.lora_B.weight, b, name, path)
    if dora:
        _copy(layer.lora_magnitude_vector, mag, name, path)


def _load_ia3(model: nn.Module, tensors: dict, path: Path, names: HFNames) -> list[str]:
    loaded = []
    for hf, (_, t) in _by_module(tensors, ("ia3_l",), path, names).items():
        v = t["ia3_l"]
        feedforward = v.shape[0] == 1 and v.shape[-1] != 1  # (1, in) scales the input
        v = v.reshape(-1)
        parts = names.parts(hf)
        if feedforward or len(parts) == 1:  # a fused module's input is every part's input
            pieces = [(n, v) for n, _ in parts]
        else:  # its output: each part takes its rows; parts left at ones get no layer
            layers = [_module(model, n, path) for n, _ in parts]
            outs = [m.out_features for m in layers]
            if v.shape[0] != sum(outs):
                raise UsageError(
                    f"{path / WEIGHTS_FILE}: {hf} scales {v.shape[0]} outputs where this "
                    f"model's {', '.join(n for n, _ in parts)} have {sum(outs)}. Was the "
                    "adapter trained on a model of another size?"
                )
            pieces = list(zip([n for n, _ in parts], torch.split(v, outs), strict=True))
            changed = [(n, p) for n, p in pieces if not torch.all(p == 1)]
            pieces = changed or pieces
        for name, piece in pieces:
            layer = _module(model, name, path)
            if not isinstance(layer, IA3Linear):
                layer = IA3Linear(layer, feedforward=feedforward)
                _replace(model, name, layer)
            _copy(layer.ia3_l, piece, name, path)
            loaded.append(name)
    return sorted(loaded)


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
