"""The engine's forward pass for plinth decoders: the model's own computation with the module
overhead taken out, for decoding where every step is a handful of matrix-vector products.

    python -c "from plinth.infer.fast import FastDecoder; help(FastDecoder)"

At batch 1 a decode step reads every weight once and does little else, so its speed is the
memory bandwidth's, minus what Python and the framework add per operation. This path:
- concatenates q/k/v and gate/up weights ONCE (the model's own layers keep views into the fused
  tensors, so nothing is stored twice) instead of on every call, one product each;
- runs decode steps' products (up to 16 rows) through plinth's CPU kernel (int8_gemv.cpp,
  `f32_mm`): MKL's sgemm computes batch 8 at ~half the memory bandwidth, the kernel at ~the
  bandwidth, so batch-8 steps cost ~0.6x MKL's; at batch 1 it is ~5-10% slower than MKL on
  transposed weights, the layout used when the kernel is unavailable (PLINTH_F32_KERNEL=0);
- computes logits for the last position only (prefill never builds (B, T, V) logits);
- keeps the per-step attention mask as a slice of one per-batch tensor (padding is fixed for a
  batch), and runs without autograd or module hooks;
- runs int8 weight-only layers (plinth.infer.quant.Int8Linear) through the same code.
Anything it does not cover (post-norm blocks, prefix tuning, unmerged adapters) makes
`FastDecoder.supports` False and the engine calls the model itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plinth.infer.quant import Int8Linear, fuse_int8
from plinth.models.layers import KVCache


def _linear_kinds(*mods: nn.Module) -> str | None:
    if all(type(m) is nn.Linear for m in mods):
        return "float"
    if all(type(m) is Int8Linear for m in mods):
        return "int8"
    return None


class FastDecoder:
    """Forward over a KV cache for a plinth `Decoder`: hidden states -> last-position logits."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        from plinth.models.decoder import Decoder

        if type(model) is not Decoder or model.cfg.norm_position != "pre":
            return False
        for blk in model.layers:
            a, m = blk.attn, blk.mlp
            if a.prefix_kv is not None or blk.cross_attn is not None:
                return False
            if _linear_kinds(a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.up_proj,
                             m.down_proj, *([m.gate_proj] if m.gate_proj else [])) is None:
                return False
        return _linear_kinds(model.lm_head) is not None

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.cfg
        self.H, self.K, self.E = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.gqa = self.H != self.K
        self.activation = cfg.activation
        self.layers = []
        for blk in model.layers:
            a, m = blk.attn, blk.mlp
            # each takes the block's input and applies its norm itself (fused into the
            # product where the kernel can)
            qkv = _fused(a.q_proj, a.k_proj, a.v_proj, norm=blk.attn_norm)
            gate_up = None
            if m.gate_proj is not None:
                gate_up = _fused(m.gate_proj, m.up_proj, norm=blk.mlp_norm)
            n2 = _norm(blk.mlp_norm)
            up = _call(m.up_proj)
            self.layers.append((
                qkv, _norm(a.q_norm), _norm(a.k_norm), _call(a.o_proj),
                gate_up, (lambda h, n2=n2, up=up: up(n2(h))), _call(m.down_proj),
            ))
        # the final norm fused into the head where the kernel can
        self.head = _fused(model.lm_head, norm=model.norm)
        self._mask_src = None  # (pad tensor, (B, max_len) keep mask) of the current batch
        self._views_of = None  # (cache.k, per-layer views)

    @torch.inference_mode()
    def forward(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) after the last of the tokens idx (B, T), which are appended to cache."""
        model = self.model
        B, T = idx.shape
        H, K, E = self.H, self.K, self.E
        positions = cache.positions(T)
        x = F.embedding(idx, model.embed_tokens.weight)  # (B, T, D)
        if model.embed_positions is not None:
            from plinth.models.layers import position_ids

            x = x + model.embed_positions(position_ids(positions, T, model.cfg, idx.device))
        rope = model.rope(positions, T) if model.rope is not None else None
        mask = self._mask(cache, T)
        causal = mask is None and cache.pos == 0 and T > 1
        if rope is not None:
            rope = tuple(t.to(x.dtype) for t in rope)
        pos, end = cache.pos, cache.pos + T
        if end > cache.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {cache.max_len} allocated")
        views = self._views(cache)
        for i, (qkv, qn, kn, o, gate_up, up, down) in enumerate(self.layers):
            h = qkv(x)
            if qn is None and rope is not None:  # q and k rotated together: one set of ops
                qk = _rope(h[..., : (H + K) * E].view(B, T, H + K, E), *rope)
                q, k = qk[:, :, :H], qk[:, :, H:]
                v = h[..., (H + K) * E :].view(B, T, K, E)
            else:
                q, k, v = h.split([H * E, K * E, K * E], dim=-1)
                q, k, v = q.view(B, T, H, E), k.view(B, T, K, E), v.view(B, T, K, E)
                if qn is not None:
                    q, k = qn(q), kn(k)
                if rope is not None:
                    q, k = _rope(q, *rope), _rope(k, *rope)
            kc, vc = views[i]
            kc[:, :, pos:end] = k.transpose(1, 2)
            vc[:, :, pos:end] = v.transpose(1, 2)
            k, v = kc[:, :, :end], vc[:, :, :end]  # (B, K, S, E)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.gqa
            )  # (B, H, T, E)
            x = x + o(y.transpose(1, 2).reshape(B, T, H * E))
            if gate_up is not None:
                g, u = gate_up(x).chunk(2, dim=-1)
                h = F.silu(g) * u
            elif self.activation in ("gelu", "gelu_tanh"):
                h = F.gelu(up(x), approximate="tanh" if self.activation == "gelu_tanh" else "none")
            else:  # relu2
                h = F.relu(up(x)).square()
            x = x + down(h)
        cache.advance(T)
        return self.head(x[:, -1]).float()  # (B, V): the last position only

    def _views(self, cache: KVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values) views of the cache, made once per cache tensor (the
        cache gets new tensors when finished rows are dropped)."""
        if self._views_of is None or self._views_of[0] is not cache.k:
            self._views_of = (cache.k, [(cache.k[i], cache.v[i]) for i in range(len(self.layers))])
        return self._views_of[1]

    def _mask(self, cache: KVCache, T: int) -> torch.Tensor | None:
        if T > 1 or cache.pad is None:
            return cache.attn_mask(T)  # prefill: causal and padding (None without padding)
        if self._mask_src is None or self._mask_src[0] is not cache.pad:
            s = torch.arange(cache.max_len, device=cache.pad.device)
            self._mask_src = (cache.pad, (s[None, :] >= cache.pad[:, None])[:, None, None, :])
        return self._mask_src[1][..., : cache.pos + 1]  # (B, 1, 1, S): padding never attended


def _call(lin: nn.Module):
    if type(lin) is Int8Linear:
        return lin.forward
    return _fused(lin)


def _fused(*lins: nn.Module, norm: nn.Module | None = None):
    """One projection for several linears of the same input (after `norm`, when given). The
    linears keep working, their weights now views into the one tensor (nothing is stored twice).
    With plinth's kernel the weights stay (out, in) and an RMSNorm runs inside the kernel call;
    without it they are stored transposed, (in, out) row-major: MKL's matrix-vector product
    streams W at ~1.3-1.8x the bandwidth when W.T is the contiguous one (one thread)."""
    pre = _norm(norm) if norm is not None else (lambda x: x)
    if type(lins[0]) is Int8Linear:
        f = fuse_int8(list(lins)).forward if len(lins) > 1 else lins[0].forward
        return lambda x: f(pre(x))
    b = None if lins[0].bias is None else torch.cat([m.bias.detach() for m in lins])
    kernel = _f32_kernel(lins[0].weight)
    if kernel is not None:  # plinth's kernel: (out, in) rows, fast at batch 1 and batch 8
        w = torch.cat([m.weight.detach() for m in lins])
        start = 0
        for m in lins:
            n = m.out_features
            m.weight.data = w[start : start + n]
            if b is not None:
                m.bias.data = b[start : start + n]
            start += n

        g, eps = None, 0.0
        if isinstance(norm, nn.RMSNorm) and norm.weight is not None and norm.eps is not None:
            g, eps = norm.weight.detach(), float(norm.eps)

        def run(x):
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] > 16:  # prefill: MKL's GEMM is the faster one for many rows
                return F.linear(pre(x), w, b)
            y = kernel.f32_mm(x2, w, g, eps) if g is not None else kernel.f32_mm(pre(x2), w)
            y = y.view(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b

        return run
    wt = torch.cat([m.weight.detach().t() for m in lins], dim=1).contiguous()  # (in, out)
    start = 0
    for m in lins:
        n = m.out_features
        m.weight.data = wt[:, start : start + n].t()
        if b is not None:
            m.bias.data = b[start : start + n]
        start += n
    w = wt.t()
    return lambda x: F.linear(pre(x), w, b)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """layers.apply_rope in fewer operations (cos/sin already in x's dtype)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([-x2, x1], dim=-1), sin)


def _f32_kernel(w: torch.Tensor):
    """plinth's CPU kernel module for fp32 weights (plinth.infer.quant.cpu_kernel), or None:
    not on CPU, not fp32, not built, or PLINTH_F32_KERNEL=0."""
    import os

    from plinth.infer.quant import cpu_kernel

    if w.device.type != "cpu" or w.dtype != torch.float32:
        return None
    if os.environ.get("PLINTH_F32_KERNEL", "1") == "0":
        return None
    k = cpu_kernel()
    return k if k is not None and hasattr(k, "f32_mm") else None


def _norm(norm: nn.Module | None):
    if norm is None:
        return None
    if isinstance(norm, nn.RMSNorm) and norm.weight is not None:
        # RMSNorm as LayerNorm over [x, -x] (mean exactly 0, variance mean(x^2)), first half
        # kept: the same value, ~30% faster on CPU, where F.rms_norm of one short vector costs
        # ~14 us and decoding calls it twice per layer per token
        (d,), eps = norm.normalized_shape, norm.eps
        w2 = torch.cat([norm.weight.detach(), norm.weight.detach()])
        if norm.eps is None:
            eps = torch.finfo(norm.weight.dtype).eps
        return lambda x: F.layer_norm(torch.cat([x, -x], dim=-1), (2 * d,), w2, None, eps)[
            ..., :d]
    if isinstance(norm, nn.RMSNorm):
        shape, w, eps = norm.normalized_shape, norm.weight, norm.eps
        return lambda x: F.rms_norm(x, shape, w, eps)
    if isinstance(norm, nn.LayerNorm):
        shape, w, b, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)
    return norm
