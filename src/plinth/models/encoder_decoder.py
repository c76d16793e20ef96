"""Encoder-decoder transformer (T5 style), trained with span corruption.

    python -c "from plinth.config.schema import ModelConfig as C; from plinth.models import *; \
print(build_model(C(arch='encoder_decoder')).num_params())"

One token embedding (and learned position table, if any) shared by both stacks and, with
`tie_embeddings`, by the head. Encoder: n_layers x [bidirectional self-attention, MLP] -> norm.
Decoder: n_decoder_layers x [causal self-attention, cross-attention to the encoder output, MLP]
-> norm -> head. RoPE rotates self-attention only; cross-attention compares content.
`encode` + `decode` split the work for generation: encode the source once, then decode token by
token with a KV cache that also keeps the cross-attention keys/values.
"""

from __future__ import annotations

import torch
from torch import nn

from plinth.config.schema import ModelConfig
from plinth.models.layers import (
    Block,
    KVCache,
    RotaryEmbedding,
    init_weights,
    make_norm,
    matmul_params,
    padding_mask,
    position_ids,
    residual_std,
)


class Stack(nn.Module):
    """A sequence of blocks and the norm after them (the encoder or the decoder half)."""

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, causal, cross) for _ in range(n_layers))
        self.norm = make_norm(cfg, cfg.d_model)


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.positional == "learned"
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        self.rope = (
            None if learned else RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Stack(cfg, cfg.n_layers, causal=False, cross=False)
        self.decoder = Stack(cfg, n_dec, causal=True, cross=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, residual_std(cfg, cfg.n_layers))
        init_weights(self.decoder, cfg.init_std, residual_std(cfg, n_dec))  # its own depth
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        x = self.embed_tokens(idx)  # (B, T, D)
        if self.embed_positions is not None:
            pos = position_ids(positions, idx.shape[1], self.cfg, idx.device)
            x = x + self.embed_positions(pos)
        return self.drop(x)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, D). src_mask (B, S): 1 for tokens, 0 for padding."""
        S = src.shape[1]
        x = self._embed(src, 0)  # (B, S, D)
        rope = self.rope(0, S) if self.rope is not None else None
        mask = padding_mask(src_mask)  # (B, 1, 1, S) or None
        for block in self.encoder.layers:
            x = block(x, rope, mask)
        return self.encoder.norm(x)

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for decoder inputs tgt_in (B, T) attending to memory (B, S, D).
        With a cache, tgt_in holds only the new tokens."""
        T = tgt_in.shape[1]
        positions = 0 if cache is None else cache.positions(T)
        x = self._embed(tgt_in, positions)  # (B, T, D)
        rope = self.rope(positions, T) if self.rope is not None else None
        mask = None if cache is None else cache.attn_mask(T)
        memory_mask = padding_mask(src_mask)
        for i, block in enumerate(self.decoder.layers):
            x = block(x, rope, mask, cache, i, memory, memory_mask)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.decoder.norm(x))  # (B, T, V)

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, src_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for sources src (B, S), decoder inputs tgt_in (B, T)."""
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty decoder KV cache (self-attention; cross-attention filled on first use)."""
        p = self.embed_tokens.weight
        n_dec = len(self.decoder.layers)
        c = self.cfg
        return KVCache(
            n_dec, batch_size, max_len, c.kv_heads, c.head_dim, dtype=p.dtype, device=p.device
        )

    def num_params(self) -> int:
        """Parameters, each shared tensor counted once (= cfg.param_count())."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, tgt_len: int | None = None) -> float:
        """Training FLOPs per source token for sources of `seq_len` tokens and targets of
        `tgt_len` (default seq_len): 6 * (matmul weights x the tokens they see) plus
        12 * d_attn * (attention scores computed), divided by seq_len. Cross-attention key/value
        projections see source tokens; everything else in the decoder and the head sees target
        tokens. Span corruption targets are short (~(mask_ratio + mask_ratio/span) * seq_len)."""
        S, T = seq_len, seq_len if tgt_len is None else tgt_len
        c = self.cfg
        d_attn = c.n_heads * c.head_dim
        cross_kv = sum(
            b.cross_attn.k_proj.weight.numel() + b.cross_attn.v_proj.weight.numel()
            for b in self.decoder.layers
        )
        n_enc, n_dec = matmul_params(self.encoder), matmul_params(self.decoder) - cross_kv
        n_head = self.lm_head.weight.numel()
        matmul = 6.0 * (n_enc * S + cross_kv * S + (n_dec + n_head) * T)
        attn = 12.0 * d_attn * (c.n_layers * S * S + len(self.decoder.layers) * (T * T + T * S))
        return (matmul + attn) / S
