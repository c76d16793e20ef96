"""Generic transformer parts shared by every model family: norm, RoPE, attention, MLP, block,
KV cache, init, and the head + cross-entropy.

    python -c "from plinth.models.layers import *; print(Block)"

Blocks are pre-norm (`x + f(norm(x))`), the layout every modern LLM trains with. Attention runs
through `F.scaled_dot_product_attention` (flash/memory-efficient kernels where the device has
them) and handles grouped-query attention natively (`enable_gqa`), so keys and values are never
repeated in memory. Parameter names follow Hugging Face Llama (`q_proj`, `gate_proj`, ...) so LoRA
target patterns and checkpoint import work by name; plain q/k/v (and gate/up) projections still
run as one matrix multiply. Training losses skip the (B, T, V) logits (`linear_cross_entropy`).
Both are hand-fused autograd kernels that live apart, in plinth.models.kernels.

Shapes: B batch, T query length, S key length, D d_model, H query heads, K key/value heads,
E head_dim, F ffn_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plinth.config.schema import ModelConfig
from plinth.models.kernels import (
    chunked_linear_cross_entropy,
    chunked_token_logprobs,
    fused_linear,
)


def make_norm(cfg: ModelConfig, dim: int, bias: bool | None = None) -> nn.Module:
    """RMSNorm or LayerNorm over the last `dim` features; LayerNorm has a bias iff cfg.bias."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)  # fused F.rms_norm: ~2x a hand-written one
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias if bias is None else bias)


# ----------------------------------------------------------------------------------------- RoPE


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (Su et al.; Hugging Face "rotate half" layout).

    cos/sin are precomputed for max_seq_len positions in fp32 and grown on demand (generation
    past the training length). They are buffers that are not saved: they follow from the config.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (E/2,)
        self._build(max_seq_len)

    def _build(self, n: int, device: torch.device | None = None) -> None:
        t = torch.arange(n, dtype=torch.float32, device=device or self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq.to(t.device))  # (n, E/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (n, E)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor | int, length: int) -> tuple[torch.Tensor, ...]:
        """cos, sin for `length` positions starting at int `positions`, or for a (B, T) tensor of
        positions. Returns (T, 1, E) or (B, T, 1, E), broadcastable against (B, T, H, E)."""
        need = (positions + length) if isinstance(positions, int) else int(positions.max()) + 1
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]), self.cos.device)
        if isinstance(positions, int):
            end = positions + length
            cos, sin = self.cos[positions:end], self.sin[positions:end]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        return cos.unsqueeze(-2), sin.unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + E/2) of x (B, T, H, E) by the position angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 activations bf16 under autocast
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Holds (n_layers, B, K, max_len, E) tensors; every forward writes its T new positions at
    `pos` and attends over [0, pos + T). Prompts of different lengths are left-padded so all rows
    advance together: `pad[b]` leading slots of row b are padding, masked out of attention, and
    the row's positions start at 0 after them. `cross` keeps the encoder-decoder's cross-attention
    keys/values, computed once from the encoder output.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | None = None,
    ):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.pad = None if pad is None or not bool(pad.any()) else pad.to(device)  # (B,)
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, K, T, E) at the current position; return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        if k.dtype != self.k.dtype and self.pos == 0:
            # compute dtype differs from the weights' (e.g. FSDP gathers bf16 copies of fp32
            # weights): store what attention computes in, once, before anything is cached
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, K, S, E)

    def advance(self, n: int) -> None:
        self.pos += n

    def positions(self, length: int) -> torch.Tensor | int:
        """Positions of the next `length` tokens: an int offset, or (B, T) when rows are padded."""
        if self.pad is None:
            return self.pos
        idx = torch.arange(self.pos, self.pos + length, device=self.pad.device)
        return (idx[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)

    def attn_mask(self, length: int) -> torch.Tensor | None:
        """Boolean mask (B|1, 1, T, S) for the next `length` queries, or None when plain causal
        attention (prefill from 0) or no mask (one new token) is exact."""
        if self.pad is None and (self.pos == 0 or length == 1):
            return None
        end = self.pos + length
        q = torch.arange(self.pos, end, device=self.k.device)[:, None]  # (T, 1)
        s = torch.arange(end, device=self.k.device)[None, :]  # (1, S)
        mask = s <= q  # (T, S)
        if self.pad is not None:
            # padding slots are never attended; a padding query sees itself so no row is empty
            mask = (mask & (s >= self.pad[:, None, None])) | (s == q)  # (B, T, S)
        return mask.unsqueeze(-3)  # (B|1, 1, T, S)


# ------------------------------------------------------------------------------------ attention


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional QK-norm and RoPE.

    Self-attention when `memory` is None (causal or bidirectional), else cross-attention to
    `memory` (B, S, D), e.g. the encoder output.
    """

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False):
        super().__init__()
        d, e = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, e
        self.causal, self.cross = causal, cross
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(d, cfg.n_heads * e, bias=qkv_bias)
        self.k_proj = nn.Linear(d, cfg.kv_heads * e, bias=qkv_bias)
        self.v_proj = nn.Linear(d, cfg.kv_heads * e, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * e, d, bias=cfg.bias)
        # per-head norms of queries and keys (Qwen3/OLMo2 style): a scale only
        self.q_norm = make_norm(cfg, e, bias=False) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, e, bias=False) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        # extension point, set from outside (prefix tuning, plinth.peft.prefix): a module called
        # as prefix_kv(B) that returns keys and values (B, K, P, E) every query attends to
        self.prefix_kv: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, D)
        if memory is None and _plain(self.q_proj, self.k_proj, self.v_proj):
            q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)  # one GEMM
        else:
            q, k, v = self.q_proj(x), None, None  # keys/values from `memory` (or x) below
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, E)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.cross and cache is not None and layer in cache.cross:
            k, v = cache.cross[layer]  # computed from the encoder output on the first step
        else:
            src = x if memory is None else memory
            S = src.shape[1]
            if k is None:
                k, v = self.k_proj(src), self.v_proj(src)
            k = k.view(B, S, self.n_kv_heads, self.head_dim)  # (B, S, K, E)
            v = v.view(B, S, self.n_kv_heads, self.head_dim)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if rope is not None:
                k = apply_rope(k, *rope)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, S, E)
            if cache is not None:
                if self.cross:
                    cache.cross[layer] = (k, v)
                else:
                    k, v = cache.update(layer, k, v)
        if rope is not None:
            q = apply_rope(q, *rope)
        q = q.transpose(1, 2)  # (B, H, T, E)
        if self.prefix_kv is not None:
            k, v, mask = prepend_kv(self.prefix_kv(B), k, v, mask, self.causal, T)
        # is_causal is exact only when queries and keys start together (training, prefill)
        is_causal = self.causal and mask is None and k.shape[2] == T > 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, E)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*E)
        return self.o_proj(y)  # (B, T, D)


def prepend_kv(
    prefix: tuple[torch.Tensor, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    T: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys/values (B, K, P, E) that every query sees, put before k, v (B, K, S, E). The mask
    gains P visible columns; causal attention over T > 1 queries gets an explicit mask."""
    pk, pv = prefix
    S = k.shape[2]
    if mask is None and causal and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)[None, None]
    if mask is not None:
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], pk.shape[2]), mask], dim=-1)
    return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2), mask


# ------------------------------------------------------------------------------------------ MLP


class MLP(nn.Module):
    """Feed-forward block: SwiGLU `down(silu(gate(x)) * up(x))`, or `down(act(up(x)))` with
    GELU (exact erf form, as BERT; or its tanh approximation, as GPT-2) or squared ReLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, cfg.ffn_dim
        self.activation = cfg.activation
        self.gate_proj = nn.Linear(d, f, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.up_proj = nn.Linear(d, f, bias=cfg.bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        if self.gate_proj is not None:
            if _plain(self.gate_proj, self.up_proj):
                gate, up = fused_linear(x, self.gate_proj, self.up_proj)  # one GEMM
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            h = F.silu(gate) * up  # (B, T, F)
        elif self.activation in ("gelu", "gelu_tanh"):
            approximate = "tanh" if self.activation == "gelu_tanh" else "none"
            h = F.gelu(self.up_proj(x), approximate=approximate)
        else:  # relu2
            h = F.relu(self.up_proj(x)).square()
        return self.down_proj(h)  # (B, T, D)


def _plain(*modules: nn.Module) -> bool:
    """True when all are ordinary nn.Linear layers, so their weights can be concatenated.
    Any other module (a LoRA wrapper, a quantised linear) is called on its own instead."""
    return all(type(m) is nn.Linear for m in modules)


# ---------------------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP.
    With cfg.norm_position=post (BERT) each norm follows its residual add instead."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, causal=causal)
        self.cross_attn_norm = make_norm(cfg, cfg.d_model) if cross else None
        self.cross_attn = Attention(cfg, causal=False, cross=True) if cross else None
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        memory: torch.Tensor | None = None,  # (B, S, D) encoder output, for cross-attention
        memory_mask: torch.Tensor | None = None,  # (B, 1, 1, S) True where memory is real
    ) -> torch.Tensor:
        if self.post_norm:  # norm(x + f(x)); no cross-attention (the schema refuses it)
            x = self.attn_norm(x + self.drop(self.attn(x, rope, mask, cache, layer)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))  # (B, T, D)
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, cache, layer))
        if self.cross_attn is not None:
            h = self.cross_attn(self.cross_attn_norm(x), None, memory_mask, cache, layer, memory)
            x = x + self.drop(h)
        return x + self.drop(self.mlp(self.mlp_norm(x)))  # (B, T, D)


# --------------------------------------------------------------------------------- init, counts


def init_weights(module: nn.Module, std: float, out_std: float) -> None:
    """Explicit init: normal(std) for linear and embedding weights, normal(out_std) for the
    projections that write into the residual stream (o_proj, down_proj), zero biases, unit norms.
    Scaling the residual writes by 1/sqrt(2 * n_layers) keeps the stream's variance flat in depth
    (GPT-2)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            m.reset_parameters()
    for m in module.modules():
        if isinstance(m, Attention):
            nn.init.normal_(m.o_proj.weight, mean=0.0, std=out_std)
        elif isinstance(m, MLP):
            nn.init.normal_(m.down_proj.weight, mean=0.0, std=out_std)


def residual_std(cfg: ModelConfig, n_layers: int) -> float:
    return cfg.init_std / math.sqrt(2 * n_layers)


def matmul_params(module: nn.Module) -> int:
    """Weights used in matrix multiplies (every nn.Linear, tied heads included once)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) 1/True = real token -> (B, 1, 1, S) boolean attention mask; all-padding rows attend
    everywhere so attention never divides by zero."""
    if mask is None:
        return None
    keep = mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


def position_ids(
    positions: torch.Tensor | int, length: int, cfg: ModelConfig, device: torch.device
) -> torch.Tensor:
    """Indices into a learned position table: (T,) from an int offset, or the (B, T) given."""
    if isinstance(positions, int):
        if positions + length > cfg.max_seq_len:
            raise ValueError(
                f"position {positions + length - 1} is past the learned position table "
                f"(max_seq_len={cfg.max_seq_len}); shorten the input or use positional=rope"
            )
        return torch.arange(positions, positions + length, device=device)  # (T,)
    return positions  # (B, T)


# ---------------------------------------------------------------------- head + cross-entropy

IGNORE_INDEX = -100  # label value that does not count (padding), as in F.cross_entropy


def linear_cross_entropy(
    h: torch.Tensor,  # (N, D) final hidden states
    weight: torch.Tensor,  # (V, D) output projection
    labels: torch.Tensor,  # (N,) target ids, IGNORE_INDEX where nothing counts
    z_loss: float = 0.0,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over counted rows of `cross-entropy + z_loss * logsumexp^2` and of cross-entropy
    alone (no gradient, for logging) for the logits h @ weight.T, without materialising them.

    Rows go through in chunks of `chunk` (plinth.models.kernels): the (N, V) logits, their
    log-softmax and their gradient (3 x 64 MB for the ref-cpu-decoder batch) never exist, which
    makes the head + loss ~20% faster on CPU and saves that memory on GPUs. Gradients are
    computed in the forward pass, so backward runs once per loss.
    `chunk` defaults to ~4M logits (16 MB in fp32) per chunk: 512 rows for an 8192 vocab.
    """
    chunk = chunk or max(64, 2**22 // weight.shape[0])
    return chunked_linear_cross_entropy(h, weight, labels, z_loss, chunk, IGNORE_INDEX)


def token_logprobs(
    h: torch.Tensor,  # (N, D) final hidden states
    weight: torch.Tensor,  # (V, D) output projection
    labels: torch.Tensor,  # (N,) target ids, IGNORE_INDEX where nothing counts
    chunk: int | None = None,
) -> torch.Tensor:
    """log p(label) per row (N,), 0 where ignored, for the logits h @ weight.T, without
    materialising them (plinth.models.kernels.chunked_token_logprobs): preference and RL
    losses."""
    chunk = chunk or max(64, 2**22 // weight.shape[0])
    return chunked_token_logprobs(h, weight, labels, chunk, IGNORE_INDEX)


def cross_entropy_sums(
    logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums as `linear_cross_entropy`, from materialised logits (..., V)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    labels = labels.reshape(-1)
    ce_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss_sum = ce_sum
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        loss_sum = ce_sum + z_loss * torch.where(labels != IGNORE_INDEX, lse.square(), 0.0).sum()
    return loss_sum, ce_sum.detach()
