"""Decoder-only transformer (GPT / Llama style): the causal language model.

    python -c "from plinth.config.schema import ModelConfig as C; from plinth.models import *; \
m = build_model(C()); print(m.num_params(), m.flops_per_token(256))"

token embedding (+ learned positions) -> n_layers x [causal self-attention, MLP] -> norm -> head
(with `norm_position=post` the norm moves to the embeddings and each block norms after its
residual adds). With `tie_embeddings` the head reuses the embedding matrix. A `KVCache` (see
`new_cache`) makes generation incremental: each call processes only the new tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from plinth.config.schema import ModelConfig
from plinth.models.layers import (
    IGNORE_INDEX,
    Block,
    KVCache,
    RotaryEmbedding,
    cross_entropy_sums,
    init_weights,
    linear_cross_entropy,
    make_norm,
    matmul_params,
    position_ids,
    residual_std,
    token_logprobs,
)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.positional == "learned"
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        self.rope = (
            None if learned else RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, residual_std(cfg, cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        z_loss: float = 0.0,
        segment_ids: torch.Tensor | None = None,
        token_logps: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) for token ids idx (B, T). With a cache, idx holds only the new tokens
        and their keys/values are appended to it.

        With `labels` (B, T) (IGNORE_INDEX where nothing counts) it returns the training loss
        instead, as sums over counted tokens: (cross-entropy + z_loss * logsumexp^2, cross-entropy
        without gradient). The head and the loss are then fused (`linear_cross_entropy`) and the
        (B, T, V) logits are never stored; doing it inside forward keeps DDP/FSDP/compile
        wrappers, which only see forward, in charge.

        `segment_ids` (B, T) marks packed examples (1, 2, ... within a row; 0 = padding):
        attention stays inside each example and positions restart at its first token, so a
        packed row computes exactly what each example would alone.

        `token_logps` (with labels): log p(label) per position (B, T), 0 where ignored, again
        without stored logits: what preference and RL losses are built from."""
        h = self.encode(idx, cache, segment_ids)  # (B, T, D)
        if labels is None:
            return self.lm_head(h)  # (B, T, V)
        if token_logps:
            return self._token_logps(h, labels)
        if type(self.lm_head) is not nn.Linear:  # a swapped-in head module: plain logits
            return cross_entropy_sums(self.lm_head(h), labels, z_loss)
        return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten(), z_loss)

    def _token_logps(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if type(self.lm_head) is not nn.Linear:  # a swapped-in head module: plain logits
            logp = torch.log_softmax(self.lm_head(h).float(), dim=-1)
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return torch.where(labels != IGNORE_INDEX, picked, 0.0)
        out = token_logprobs(h.flatten(0, 1), self.lm_head.weight, labels.flatten())
        return out.view(labels.shape)  # (B, T)

    def encode(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D) after the last norm: what the LM head reads, and what
        task heads pool (see `forward` for cache and segment_ids)."""
        T = idx.shape[1]
        positions = 0 if cache is None else cache.positions(T)  # int offset or (B, T)
        packed_mask = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed training rows) cannot be used with a cache")
            positions, packed_mask = segment_positions_and_mask(segment_ids)
        x = self.embed_tokens(idx)  # (B, T, D)
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids(positions, T, self.cfg, idx.device))
        rope = self.rope(positions, T) if self.rope is not None else None
        mask = None if cache is None else cache.attn_mask(T)  # None: causal (or one new token)
        if packed_mask is not None:
            mask = packed_mask
        post = self.cfg.norm_position == "post"
        x = self.drop(self.norm(x) if post else x)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return x if post else self.norm(x)

    def new_cache(self, batch_size: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens; `pad` (B,) counts
        the left-padding slots of each row (prompts of different lengths)."""
        p = self.embed_tokens.weight
        return KVCache(
            self.cfg.n_layers,
            batch_size,
            max_len,
            self.cfg.kv_heads,
            self.cfg.head_dim,
            dtype=p.dtype,
            device=p.device,
            pad=pad,
        )

    def num_params(self) -> int:
        """Trainable-or-not parameters, each shared tensor counted once (= cfg.param_count())."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context `seq_len`:
        6 * N + 12 * n_layers * d_attn * seq_len, where N counts the weights of every matrix
        multiply (attention, MLP and the head; not the embedding lookup, norms or biases) and
        d_attn = n_heads * head_dim. The attention term is the PaLM/nanoGPT convention (QK^T and
        AV over the full context; causal kernels skip about half of it)."""
        d_attn = self.cfg.n_heads * self.cfg.head_dim
        return 6.0 * matmul_params(self) + 12.0 * self.cfg.n_layers * d_attn * seq_len


def segment_positions_and_mask(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at each segment's first token, and the (B, 1, T, T) mask
    that is causal and keeps each query inside its own segment."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return idx - first, (same & causal).unsqueeze(1)
