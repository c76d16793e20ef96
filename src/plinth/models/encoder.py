"""Encoder-only transformer (BERT style), trained with masked language modelling.

    python -c "from plinth.config.schema import ModelConfig as C; from plinth.models import *; \
print(build_model(C(arch='encoder')).num_params())"

token embedding (+ learned positions, + token types) -> n_layers x [bidirectional self-attention,
MLP] -> norm. `encode` returns those hidden states (B, T, D) for pooled task heads; `forward` adds
the MLM head, the output projection to the vocabulary (tied to the embedding with
`tie_embeddings`). Blocks are pre-norm with a final norm by default, unlike BERT's post-norm: it
trains stably without warmup tricks and has the same parameter count (the final norm takes the
place of BERT's embedding norm). `norm_position=post` with `type_vocab_size=2` is BERT exactly
(imported checkpoints): the norm then normalises the embeddings and each block norms after its
residual adds.
"""

from __future__ import annotations

import torch
from torch import nn

from plinth.config.schema import ModelConfig
from plinth.models.layers import (
    Block,
    RotaryEmbedding,
    init_weights,
    make_norm,
    matmul_params,
    padding_mask,
    position_ids,
    residual_std,
)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.positional == "learned"
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        types = cfg.type_vocab_size
        self.embed_types = nn.Embedding(types, cfg.d_model) if types else None
        self.rope = (
            None if learned else RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, residual_std(cfg, cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def encode(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D). attention_mask (B, T): 1 for tokens, 0 for padding;
        token_type_ids (B, T): segment ids when cfg.type_vocab_size > 0 (None: all 0)."""
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids(0, T, self.cfg, idx.device))
        if self.embed_types is not None:
            x = x + (self.embed_types.weight[0] if token_type_ids is None
                     else self.embed_types(token_type_ids))
        rope = self.rope(0, T) if self.rope is not None else None
        mask = padding_mask(attention_mask)  # (B, 1, 1, T) or None
        post = self.cfg.norm_position == "post"
        x = self.drop(self.norm(x) if post else x)
        for block in self.layers:
            x = block(x, rope, mask)
        return x if post else self.norm(x)  # (B, T, D)

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits (B, T, V). With a boolean `select` (B, T), only the selected positions go
        through the head and the result is (N, V): masked LM needs ~15% of them, which saves
        most of the head's compute and memory."""
        h = self.encode(idx, attention_mask, token_type_ids)  # (B, T, D)
        if select is not None:
            h = h[select]  # (N, D)
        return self.lm_head(h)

    def num_params(self) -> int:
        """Parameters, each shared tensor counted once (= cfg.param_count())."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N + 12 * n_layers * d_attn * seq_len, N the matmul
        weights including the MLM head over every position (see Decoder.flops_per_token);
        bidirectional attention computes the whole attention term."""
        d_attn = self.cfg.n_heads * self.cfg.head_dim
        return 6.0 * matmul_params(self) + 12.0 * self.cfg.n_layers * d_attn * seq_len
