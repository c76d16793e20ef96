"""Hugging Face model families: one small mapping each, read in both directions.

    python -c "from plinth.hf.families import FAMILIES; print(sorted(FAMILIES))"

A family knows how a Hugging Face `config.json` becomes the fields of a plinth `ModelConfig`
(`to_plinth`) and back (`to_hf`), which plinth configs it can express (`fits`), and where each
plinth parameter lives in a Hugging Face checkpoint (`source`): the tensor's name inside the
base model, whether it is stored transposed (GPT-2's Conv1D) and which slice of a fused tensor
it is (GPT-2's c_attn holds q, k and v). Import and export are the same table read in opposite
directions (importer.py, exporter.py), so a mapping cannot be right one way and wrong the other.

Supported: the Llama family (llama, SmolLM = llama, mistral, qwen2 with its q/k/v biases,
qwen3 with QK-norm), gpt2 and bert (post-norm encoder with token types).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from plinth.config.schema import ModelConfig


class Unsupported(Exception):
    """The checkpoint (or plinth config) uses a feature the other side cannot express."""


@dataclass(frozen=True)
class Source:
    """Where one plinth parameter lives in a Hugging Face checkpoint."""

    name: str  # inside the base model (no prefix), or top-level when `head`
    transpose: bool = False  # stored (in, out): GPT-2's Conv1D
    part: tuple[int, int] | None = None  # (index, count): row block of a fused tensor
    head: bool = False  # outside the base model (lm_head): never prefixed


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # Hugging Face `model_type`s it covers, the default first
    prefix: str  # the base model's prefix inside the *For* architectures
    architectures: dict[str, tuple[str, str]]  # model_type -> (architecture exported, prefix)
    to_plinth: Callable[[dict], tuple[dict, list[str]]]  # config.json -> (fields, notes)
    to_hf: Callable[[ModelConfig, str], dict]  # config, model_type -> config.json fields
    fits: Callable[[ModelConfig], list[str]]  # model_types that express this config, best first
    source: Callable[[str], Source]  # plinth parameter name -> Source
    ignore: tuple[str, ...] = ()  # regexes (without prefix) of stored buffers to drop
    legacy: tuple[tuple[str, str], ...] = ()  # old key spellings -> current, applied on import


def _get(hf: dict, key: str):
    if hf.get(key) is None:
        raise Unsupported(f"config.json has no `{key}`")
    return hf[key]


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(f"no Hugging Face name for plinth parameter {name}")


def _rope_theta(hf: dict) -> float:
    """RoPE base from `rope_theta` (transformers 4) or `rope_parameters` (5); scaled RoPE
    variants (llama3, yarn, linear, dynamic) change the frequencies and are refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise Unsupported(
            f"RoPE scaling `{kind}` is not implemented in plinth (plain RoPE only)"
        )
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def _sliding_window(hf: dict) -> int | None:
    """The attention window when some layers use sliding-window attention, else None."""
    window = hf.get("sliding_window")
    if not window:
        return None
    if hf["model_type"] == "mistral":
        return int(window)
    types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or "sliding_attention" in types:
        return int(window)
    return None


# ------------------------------------------------------------------------------- llama family

_LLAMA_NAMES = [
    (r"^layers\.(\d+)\.attn\.", r"layers.\1.self_attn."),
    (r"^layers\.(\d+)\.attn_norm\.", r"layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"layers.\1.post_attention_layernorm."),
    (r"^(layers\.\d+\.mlp\.|embed_tokens\.|norm\.)", r"\1"),
]


def _llama_source(name: str) -> Source:
    if name == "lm_head.weight":
        return Source("lm_head.weight", head=True)
    return Source(_rename(name, _LLAMA_NAMES))


def _llama_to_plinth(hf: dict) -> tuple[dict, list[str]]:
    mt = hf["model_type"]
    d, h = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or d // h
    if head_dim * h != d:
        raise Unsupported(
            f"head_dim={head_dim} times num_attention_heads={h} is not hidden_size={d}; plinth "
            "derives head_dim as d_model / n_heads"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise Unsupported(f"hidden_act={hf['hidden_act']!r} (plinth's SwiGLU uses silu)")
    attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    fields = dict(
        arch="decoder",
        n_layers=_get(hf, "num_hidden_layers"),
        d_model=d,
        n_heads=h,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        d_ff=_get(hf, "intermediate_size"),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
        positional="rope",
        rope_theta=_rope_theta(hf),
        vocab_size=_get(hf, "vocab_size"),
        max_seq_len=hf.get("max_position_embeddings") or 2048,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if mt == "qwen2":
        fields["qkv_bias"] = True  # Qwen2 always has q/k/v biases (and none elsewhere)
    if mt == "qwen3":
        fields["qk_norm"] = True
    if attn_bias or mlp_bias:
        if not (mt == "llama" and attn_bias and mlp_bias):
            raise Unsupported(
                f"{mt} with attention_bias={attn_bias}, mlp_bias={mlp_bias}: plinth has biases "
                "on all linear layers (llama with both set) or on q/k/v only (qwen2)"
            )
        fields["bias"] = True
    notes = []
    window = _sliding_window(hf)
    if window and window < fields["max_seq_len"]:
        notes.append(
            f"sliding-window attention ({window} tokens) is not implemented; max_seq_len is "
            f"capped at the window, within which full attention is identical"
        )
        fields["max_seq_len"] = window
    return fields, notes


def _llama_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # transformers 4 reads this, 5 rope_parameters
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if model_type == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if model_type == "qwen3":
        out["attention_bias"] = False
    return out


def _llama_fits(cfg: ModelConfig) -> list[str]:
    if (cfg.arch, cfg.activation, cfg.norm, cfg.positional, cfg.norm_position) != (
        "decoder", "swiglu", "rmsnorm", "rope", "pre"
    ):
        return []
    bias, qkv = cfg.bias, cfg.qkv_bias and not cfg.bias
    if cfg.qk_norm:
        return [] if (bias or qkv) else ["qwen3"]
    if qkv:
        return ["qwen2"]
    return ["llama"] if bias else ["llama", "mistral"]


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    prefix="model.",
    architectures={
        "llama": ("LlamaForCausalLM", "model."),
        "mistral": ("MistralForCausalLM", "model."),
        "qwen2": ("Qwen2ForCausalLM", "model."),
        "qwen3": ("Qwen3ForCausalLM", "model."),
    },
    to_plinth=_llama_to_plinth,
    to_hf=_llama_to_hf,
    fits=_llama_fits,
    source=_llama_source,
    ignore=(r"rotary_emb\.inv_freq$",),
)


# --------------------------------------------------------------------------------------- gpt2

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_GPT2_NAMES = [
    (r"^embed_tokens\.", "wte."),
    (r"^embed_positions\.", "wpe."),
    (r"^norm\.", "ln_f."),
    (r"^layers\.(\d+)\.attn_norm\.", r"h.\1.ln_1."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"h.\1.ln_2."),
    (r"^layers\.(\d+)\.attn\.o_proj\.", r"h.\1.attn.c_proj."),
    (r"^layers\.(\d+)\.mlp\.up_proj\.", r"h.\1.mlp.c_fc."),
    (r"^layers\.(\d+)\.mlp\.down_proj\.", r"h.\1.mlp.c_proj."),
]


def _gpt2_source(name: str) -> Source:
    if name == "lm_head.weight":
        return Source("lm_head.weight", head=True)
    weight = name.endswith(".weight")
    m = re.match(r"^layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$", name)
    if m:  # q, k, v are thirds of one Conv1D
        return Source(f"h.{m[1]}.attn.c_attn.{m[3]}", weight, ("qkv".index(m[2]), 3))
    hf = _rename(name, _GPT2_NAMES)
    return Source(hf, transpose=weight and re.search(r"\.c_(proj|fc)\.", hf) is not None)


def _gpt2_to_plinth(hf: dict) -> tuple[dict, list[str]]:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise Unsupported(f"activation_function={act!r} (supported: {sorted(_GPT2_ACTIVATIONS)})")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise Unsupported("non-standard attention scaling (scale_attn_weights=false or "
                          "scale_attn_by_inverse_layer_idx=true)")
    if hf.get("add_cross_attention"):
        raise Unsupported("add_cross_attention=true (a GPT-2 decoder with cross-attention)")
    d = _get(hf, "n_embd")
    fields = dict(
        arch="decoder",
        n_layers=_get(hf, "n_layer"),
        d_model=d,
        n_heads=_get(hf, "n_head"),
        d_ff=hf.get("n_inner") or 4 * d,
        activation=_GPT2_ACTIVATIONS[act],
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon") or 1e-5),
        positional="learned",
        bias=True,
        vocab_size=_get(hf, "vocab_size"),
        max_seq_len=hf.get("n_positions") or hf.get("n_ctx") or 1024,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    return fields, []


def _gpt2_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    return dict(
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.ffn_dim,
        activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        layer_norm_epsilon=cfg.norm_eps,
        n_positions=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
    )


def _gpt2_fits(cfg: ModelConfig) -> list[str]:
    ok = (
        (cfg.arch, cfg.norm, cfg.positional, cfg.norm_position) == (
            "decoder", "layernorm", "learned", "pre")
        and cfg.activation in ("gelu", "gelu_tanh")
        and cfg.bias
        and not cfg.qk_norm
        and cfg.kv_heads == cfg.n_heads
    )
    return ["gpt2"] if ok else []


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    prefix="transformer.",
    architectures={"gpt2": ("GPT2LMHeadModel", "transformer.")},
    to_plinth=_gpt2_to_plinth,
    to_hf=_gpt2_to_hf,
    fits=_gpt2_fits,
    source=_gpt2_source,
    ignore=(r"^h\.\d+\.attn\.(bias|masked_bias)$",),  # causal-mask buffers of old checkpoints
)


# --------------------------------------------------------------------------------------- bert

_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_BERT_NAMES = [
    (r"^embed_tokens\.", "embeddings.word_embeddings."),
    (r"^embed_positions\.", "embeddings.position_embeddings."),
    (r"^embed_types\.", "embeddings.token_type_embeddings."),
    (r"^norm\.", "embeddings.LayerNorm."),
    (r"^layers\.(\d+)\.attn\.q_proj\.", r"encoder.layer.\1.attention.self.query."),
    (r"^layers\.(\d+)\.attn\.k_proj\.", r"encoder.layer.\1.attention.self.key."),
    (r"^layers\.(\d+)\.attn\.v_proj\.", r"encoder.layer.\1.attention.self.value."),
    (r"^layers\.(\d+)\.attn\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^layers\.(\d+)\.mlp\.up_proj\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.down_proj\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"encoder.layer.\1.output.LayerNorm."),
]


def _bert_source(name: str) -> Source:
    return Source(_rename(name, _BERT_NAMES))


def _bert_to_plinth(hf: dict) -> tuple[dict, list[str]]:
    act = hf.get("hidden_act", "gelu")
    if act not in _BERT_ACTIVATIONS:
        raise Unsupported(f"hidden_act={act!r} (supported: {sorted(_BERT_ACTIVATIONS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise Unsupported(f"position_embedding_type={hf['position_embedding_type']!r} "
                          "(plinth has absolute learned positions)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise Unsupported("a BERT used as a decoder (is_decoder / add_cross_attention)")
    fields = dict(
        arch="encoder",
        n_layers=_get(hf, "num_hidden_layers"),
        d_model=_get(hf, "hidden_size"),
        n_heads=_get(hf, "num_attention_heads"),
        d_ff=_get(hf, "intermediate_size"),
        activation=_BERT_ACTIVATIONS[act],
        norm="layernorm",
        norm_position="post",
        norm_eps=float(hf.get("layer_norm_eps") or 1e-12),
        positional="learned",
        bias=True,
        type_vocab_size=hf.get("type_vocab_size", 2),
        tie_embeddings=True,  # the MLM decoder is the word embedding (BertModel has no head)
        vocab_size=_get(hf, "vocab_size"),
        max_seq_len=hf.get("max_position_embeddings") or 512,
    )
    return fields, []


def _bert_to_hf(cfg: ModelConfig, model_type: str) -> dict:
    return dict(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_dim,
        hidden_act="gelu" if cfg.activation == "gelu" else "gelu_new",
        layer_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        vocab_size=cfg.vocab_size,
        position_embedding_type="absolute",
        tie_word_embeddings=True,
    )


def _bert_fits(cfg: ModelConfig) -> list[str]:
    ok = (
        (cfg.arch, cfg.norm, cfg.positional, cfg.norm_position) == (
            "encoder", "layernorm", "learned", "post")
        and cfg.activation in ("gelu", "gelu_tanh")
        and cfg.bias
        and cfg.tie_embeddings
        and cfg.type_vocab_size > 0
        and not cfg.qk_norm
        and cfg.kv_heads == cfg.n_heads
    )
    return ["bert"] if ok else []


BERT = Family(
    name="bert",
    model_types=("bert",),
    prefix="bert.",
    architectures={"bert": ("BertModel", "")},  # the base model: no head to export
    to_plinth=_bert_to_plinth,
    to_hf=_bert_to_hf,
    fits=_bert_fits,
    source=_bert_source,
    ignore=(r"^embeddings\.(position_ids|token_type_ids)$",),
    legacy=((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")),
)


FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GPT2, BERT)}
MODEL_TYPES: dict[str, Family] = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def family_for(model_type: str | None) -> Family | None:
    return MODEL_TYPES.get(model_type or "")


def families_for_config(cfg: ModelConfig) -> list[tuple[Family, str]]:
    """(family, model_type) pairs that can express `cfg` exactly, best first."""
    return [(f, mt) for f in FAMILIES.values() for mt in f.fits(cfg)]
