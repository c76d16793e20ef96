"""The `model` section: the architecture every recipe builds, and its parameter count.

    plinth config explain model
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from plinth.config.sections.base import Section


class ModelConfig(Section):
    """Transformer architecture: the shape of the network, shared by every recipe."""

    arch: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    """Model family. `decoder`: GPT/Llama-style causal LM (generation, chat, most fine-tuning).
    `encoder`: BERT-style bidirectional model (embeddings, classification; trained with MLM).
    `encoder_decoder`: T5-style (sequence-to-sequence, trained with span corruption)."""

    n_layers: int = Field(4, ge=1, le=512)
    """Number of transformer blocks (in each stack for encoder_decoder). More layers: more
    capacity and compute per token, linearly more activation memory. Scale with d_model."""

    n_decoder_layers: int | None = Field(None, ge=1, le=512)
    """encoder_decoder only: blocks in the decoder stack; None uses n_layers. Shallower decoders
    make generation cheaper at a small quality cost."""

    d_model: int = Field(256, ge=8, le=65536)
    """Width of the residual stream (hidden size). Parameters grow with its square; must be a
    multiple of n_heads. The main knob of model size together with n_layers."""

    n_heads: int = Field(4, ge=1, le=1024)
    """Attention (query) heads. head_dim = d_model / n_heads; 64-128 per head is the usual
    sweet spot for speed on GPUs. Must divide d_model."""

    n_kv_heads: int | None = Field(None, ge=1, le=1024)
    """Key/value heads for grouped-query attention; None means n_heads (classic multi-head).
    Fewer KV heads shrink the KV cache and speed up generation with little quality loss; must
    divide n_heads (1 = multi-query attention)."""

    d_ff: int | None = Field(None, ge=1, le=1_048_576)
    """Hidden width of the MLP. None derives it: 4*d_model for gelu(_tanh)/relu2, 8/3*d_model
    rounded up to a multiple of 64 for swiglu (same parameter count as a 4x gelu MLP)."""

    activation: Literal["swiglu", "gelu", "gelu_tanh", "relu2"] = "swiglu"
    """MLP non-linearity. swiglu (Llama) trains best per parameter; gelu (exact erf form) matches
    BERT checkpoints and gelu_tanh (its tanh approximation, `gelu_new`) GPT-2 ones; relu2 (squared
    ReLU) is cheap and strong for small pretraining runs."""

    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer. rmsnorm is cheaper and standard in modern LLMs; layernorm is what
    GPT-2/BERT checkpoints were trained with."""

    norm_position: Literal["pre", "post"] = "pre"
    """Where each block normalises. pre (`x + f(norm(x))`, then a final norm) trains stably at
    any depth without warmup tricks and is what modern models use; post (`norm(x + f(x))`, the
    original Transformer and BERT; the model's own norm then normalises the embeddings) is
    needed to import BERT checkpoints. decoder and encoder only."""

    norm_eps: float = Field(1e-5, gt=0, le=1e-2)
    """Epsilon inside the norm for numerical safety. Match the checkpoint when importing
    (Llama uses 1e-5 or 1e-6, BERT 1e-12); otherwise leave it."""

    positional: Literal["rope", "learned"] = "rope"
    """Position encoding. rope (rotary) extrapolates better and has no parameters; learned
    absolute embeddings match GPT-2/BERT checkpoints and cap the context at max_seq_len."""

    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency. Larger values (e.g. 500000) suit long contexts; keep 10000 for
    contexts up to a few thousand tokens or to match a checkpoint."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention and residual branches. 0 for pretraining (data is the regulariser);
    0.05-0.1 helps when fine-tuning small datasets that overfit."""

    bias: bool = False
    """Add biases to linear layers and norms. Modern LLMs drop them (fewer parameters, more
    stable); GPT-2 and BERT checkpoints need them on."""

    qkv_bias: bool = False
    """Bias on the query/key/value projections only (Qwen2 has it). Needed to import such
    checkpoints; otherwise leave off."""

    qk_norm: bool = False
    """Normalise queries and keys per head before attention. Stabilises training at high
    learning rates and large scale at a small cost; needed for checkpoints that use it."""

    type_vocab_size: int = Field(0, ge=0, le=1024)
    """Token-type (segment) embeddings added to the token embeddings: BERT's sentence A/B ids
    (it has 2). 0 means none, the right choice unless importing such a checkpoint; encoder
    only."""

    tie_embeddings: bool = False
    """Share the input embedding and output head weights. Saves vocab_size*d_model parameters,
    which matters for small models; untied heads train slightly better at scale."""

    vocab_size: int = Field(8192, ge=2, le=2**22)
    """Number of token ids; must match the tokenizer (checked when data and model meet). A
    bigger vocab shortens sequences but costs embedding memory; for small models keep it small."""

    max_seq_len: int = Field(256, ge=1, le=2**20)
    """Longest sequence the model trains on (context length). Attention cost grows with its
    square and activation memory linearly; raise it only when the data has long documents."""

    init_std: float = Field(0.02, gt=0, le=1.0)
    """Standard deviation of the normal weight init; output projections are further scaled by
    1/sqrt(2*n_layers) so the residual stream does not grow with depth. 0.02 is the GPT-2/Llama
    default."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}): each head gets "
                f"d_model/n_heads dimensions. Pick n_heads from {_divisors(self.d_model)} or "
                "change d_model."
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}) so that "
                f"query heads share key/value heads evenly. Pick one of "
                f"{_divisors(self.n_heads)}, or leave it unset for multi-head attention."
            )
        if self.norm_position == "post" and self.arch == "encoder_decoder":
            raise ValueError(
                "norm_position=post is implemented for decoder and encoder models only; use "
                "norm_position=pre with arch=encoder_decoder"
            )
        if self.type_vocab_size and self.arch != "encoder":
            raise ValueError(
                f"type_vocab_size={self.type_vocab_size} needs arch=encoder (token-type "
                f"embeddings are a BERT feature); set type_vocab_size=0 for arch={self.arch}"
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                f"rope needs an even head_dim, but d_model/n_heads = {self.head_dim}. Change "
                "d_model or n_heads, or set positional=learned."
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def param_count(self) -> int:
        """Parameters of the model this config builds (the model classes must agree exactly)."""
        d, ff, hd = self.d_model, self.ffn_dim, self.head_dim
        q, kv = self.n_heads * hd, self.kv_heads * hd
        norm = 2 * d if (self.norm == "layernorm" and self.bias) else d
        attn = d * q + 2 * d * kv + q * d
        if self.bias or self.qkv_bias:
            attn += q + 2 * kv
        if self.bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        mlp = (3 if self.activation == "swiglu" else 2) * d * ff
        if self.bias:
            mlp += (2 if self.activation == "swiglu" else 1) * ff + d
        block = attn + mlp + 2 * norm
        embed = self.vocab_size * d + (self.max_seq_len * d if self.positional == "learned" else 0)
        embed += self.type_vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        if self.arch == "encoder_decoder":
            n_dec = self.n_decoder_layers or self.n_layers
            # decoder blocks add cross-attention (same shape as self-attention) and its norm
            return embed + head + self.n_layers * block + n_dec * (block + attn + norm) + 2 * norm
        return embed + head + self.n_layers * block + norm


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0][:12]
