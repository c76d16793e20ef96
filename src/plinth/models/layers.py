"""Generic transformer parts shared by every model family: norm, RoPE, attention, MLP, block,
KV cache, init, and the fused head + cross-entropy.

    python -c "from plinth.models.layers import *; print(Block)"

Blocks are pre-norm (`x + f(norm(x))`), the layout every modern LLM trains with. Attention runs
through `F.scaled_dot_product_attention` (flash/memory-efficient kernels where the device has
them) and handles grouped-query attention natively (`enable_gqa`), so keys and values are never
repeated in memory. Parameter names follow Hugging Face Llama (`q_proj`, `gate_proj`, ...) so LoRA
target patterns and checkpoint import work by name; plain q/k/v (and gate/up) projections still
run as one matrix multiply. Training losses skip the (B, T, V) logits (`linear_cross_entropy`).

Shapes: B batch, T query length, S key length, D d_model, H query heads, K key/value heads,
E head_dim, F ffn_dim.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from plinth.config.schema import ModelConfig


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
            q, k, v = _fused_linear(x, self.q_proj, self.k_proj, self.v_proj)  # one GEMM
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
                gate, up = _fused_linear(x, self.gate_proj, self.up_proj)  # one GEMM
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


def _fused_linear(x: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """Several projections of the same input as one matrix multiply on concatenated weights.
    One wide GEMM uses the hardware better than three narrow ones (~5% faster training steps on
    CPU). The concatenated matrix is a temporary of forward (and, in 16 bits, of backward):
    autograd keeps only x and the separate weights, which exist anyway (F.linear on a
    concatenation would keep the copy until backward, 18 GB for the 7B preset in fp32). Under
    autocast x and the weights are cast to its dtype, as F.linear would. Returns views into one
    (B, T, sum) tensor."""
    dtype = _compute_dtype(x)
    weights = [m.weight for m in linears]
    biases = [] if linears[0].bias is None else [m.bias for m in linears]
    y = _FusedLinear.apply(x.to(dtype), dtype, len(weights), *weights, *biases)
    return y.split([m.out_features for m in linears], dim=-1)


def _concat(tensors: list[torch.Tensor], dtype: torch.dtype, dim: int = 0) -> torch.Tensor:
    """torch.cat of 2-D tensors, straight into `dtype` (no concatenated copy in the original)."""
    if all(t.dtype == dtype for t in tensors):
        return torch.cat(tensors, dim)
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.cat(tensors, dim, out=tensors[0].new_empty(shape, dtype=dtype))


class _FusedLinear(torch.autograd.Function):
    """x @ cat(weights).T + cat(biases), saving x and references to the weights (no copy).

    forward(x, dtype, n, *weights, *biases): x is already in the compute dtype; weights and
    biases (n each, or no biases) are cast to it. Backward runs with autocast off (everything is
    in `dtype` already, as in forward); see `_matmul_concat` for x's gradient."""

    @staticmethod
    def forward(ctx, x, dtype, n, *params):
        weights, biases = params[:n], params[n:]
        ctx.save_for_backward(x, *weights)
        ctx.dtype = dtype
        bias = _concat(biases, dtype) if biases else None
        return F.linear(x, _concat(weights, dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        n, dtype = len(weights), ctx.dtype
        need_w, need_b = ctx.needs_input_grad[3 : 3 + n], ctx.needs_input_grad[3 + n :]
        grad_x, grad_w, grad_b = None, [None] * n, [None] * len(need_b)
        sizes = [w.shape[0] for w in weights]
        with _autocast_off(grad.device.type):
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (N, sum)
            if ctx.needs_input_grad[0]:
                grad_x = _matmul_concat(g, weights, sizes, dtype).view(x.shape)
            if any(need_w):  # one wide GEMM, then views of it per weight (as F.linear's)
                gw = (g.t() @ x.reshape(-1, x.shape[-1])).to(weights[0].dtype)
                grad_w = [
                    p if need else None for p, need in zip(gw.split(sizes), need_w, strict=True)
                ]
            if any(need_b):
                gb = g.sum(0).to(weights[0].dtype)
                grad_b = [
                    p if need else None for p, need in zip(gb.split(sizes), need_b, strict=True)
                ]
        return grad_x, None, None, *grad_w, *grad_b


def _matmul_concat(g, weights, sizes, dtype):
    """g (N, sum) @ cat(weights) (sum, D) in `dtype`. In fp32 without a cast, the sum of the
    pieces' products (no copy); in 16 bits (weights cast by autocast, or bf16 ones from FSDP's
    mixed precision) one GEMM on a concatenated copy, so partial sums are not rounded."""
    if dtype in (torch.float32, torch.float64) and all(w.dtype == dtype for w in weights):
        out = None
        for gi, w in zip(g.split(sizes, dim=1), weights, strict=True):
            out = gi @ w if out is None else out.addmm_(gi, w)
        return out
    if g.device.type == "cpu":  # 16-bit CPU GEMMs are ~10x faster with cat(W) laid out (D, sum)
        return g @ _concat([w.t() for w in weights], dtype, dim=1).t()
    return g @ _concat(weights, dtype)


def _autocast_off(device_type: str):
    """Autocast disabled for `device_type` where it is on (backward may run inside autocast)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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


# --------------------------------------------------------------------- fused head + cross-entropy

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

    Rows go through in chunks of `chunk`: logits -> softmax -> the logits' gradient, which is
    multiplied into the gradients of h and weight at once while the chunk is still in cache. The
    (N, V) logits, their log-softmax and their gradient (3 x 64 MB for the ref-cpu-decoder batch)
    never exist, which makes the head + loss ~20% faster on CPU and saves that memory on GPUs.
    The gradients are computed in the forward pass and scaled in backward (the loss is linear in
    its upstream gradient), so this costs nothing extra when backward() follows, as in training.
    Backward hands them over and keeps no reference, so it runs once per loss.
    `chunk` defaults to ~4M logits (16 MB in fp32) per chunk: 512 rows for an 8192 vocab.
    """
    chunk = chunk or max(64, 2**22 // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels, z_loss, chunk)
    with torch.no_grad():
        return _linear_ce_chunks(h, weight, labels, z_loss, chunk, grads=None)


@torch.compiler.disable  # already fused by hand; runs eagerly inside a compiled model
def _linear_ce_chunks(h, weight, labels, z_loss, chunk, grads):
    keep = labels != IGNORE_INDEX
    n_keep = int(keep.sum())
    if n_keep < labels.shape[0]:
        # rows that count nothing (prompts in SFT, padding) need neither logits nor gradients:
        # the head runs on the counted rows only (most of a fine-tuning batch is prompt)
        idx = keep.nonzero().squeeze(1)
        grad_h, grad_w = grads if grads is not None else (None, None)
        sub_h = None if grad_h is None else torch.empty(n_keep, h.shape[1], dtype=h.dtype,
                                                        device=h.device)
        out = _linear_ce_chunks(
            h.index_select(0, idx), weight, labels.index_select(0, idx), z_loss, chunk,
            None if grads is None else (sub_h, grad_w),
        )
        if grad_h is not None:
            grad_h.zero_().index_copy_(0, idx, sub_h)
        return out
    dtype = _compute_dtype(h)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(dtype)
        for s in range(0, h.shape[0], chunk):
            # one call per chunk: its logits are freed on return, before the next chunk's exist
            loss_c, ce_c = _linear_ce_chunk(h, w, labels, z_loss, s, chunk, grads)
            loss_sum += loss_c
            ce_sum += ce_c
    return loss_sum, ce_sum


def _linear_ce_chunk(h, w, labels, z_loss, s, chunk, grads):
    """Loss and cross-entropy sums of rows [s, s + chunk); their gradients written into
    `grads` (grad_h rows, grad_w accumulated) unless None. Matmuls in w's dtype."""
    dtype = w.dtype
    hc, yc = h[s : s + chunk].to(dtype), labels[s : s + chunk]
    valid = yc != IGNORE_INDEX  # (C,)
    target = yc.clamp(min=0)[:, None]  # (C, 1)
    logits = (hc @ w.t()).float()  # (C, V)
    picked = logits.gather(1, target).squeeze(1)  # logit of the target
    peak = logits.amax(dim=-1, keepdim=True)
    e = logits.sub_(peak).exp_()  # unnormalised softmax, in place over the logits
    total = e.sum(dim=-1, keepdim=True)
    lse = (peak + total.log()).squeeze(1)  # (C,) logsumexp
    ce = torch.where(valid, lse - picked, 0.0).sum()
    loss = ce + z_loss * torch.where(valid, lse.square(), 0.0).sum()
    if grads is None:
        return loss, ce
    # d/dlogits of (lse - logit[y] + z * lse^2) = softmax * (1 + 2 z lse) - onehot(y)
    scale = (1.0 + 2.0 * z_loss * lse[:, None]) if z_loss else 1.0
    g = e.mul_(torch.where(valid[:, None], scale / total, 0.0))  # rows not counted -> 0
    g.scatter_add_(1, target, torch.where(valid, -1.0, 0.0)[:, None])
    g = g.to(dtype)
    grad_h, grad_w = grads  # None where that input needs no gradient (a frozen head)
    if grad_h is not None:
        grad_h[s : s + chunk] = g @ w  # (C, D)
    if grad_w is not None and grad_w.dtype == dtype:
        grad_w.addmm_(g.t(), hc)  # (V, D), accumulated in place
    elif grad_w is not None:
        # a 16-bit (V, D) product added to the fp32 sum in blocks of rows: no fp32 copy of it
        gw, rows = g.t() @ hc, max(1, 2**22 // hc.shape[1])
        for r in range(0, gw.shape[0], rows):
            grad_w[r : r + rows] += gw[r : r + rows].to(grad_w.dtype)
    return loss, ce


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, z_loss, chunk):
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        loss_sum, ce_sum = _linear_ce_chunks(h, weight, labels, z_loss, chunk, (grad_h, grad_w))
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce_sum)
        return loss_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        # hand the gradients over, scaled in place, and drop them: the caller's loss output
        # (kept by the training loop until the next forward returns) must not keep them alive
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward twice through one loss is not supported (its "
                "gradients, computed in forward, are released by the first backward)"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
