"""Prefix tuning (Li & Liang 2021): P learned key/value pairs per self-attention layer that every
query attends to, as if a trained prompt of P tokens preceded the input.

    python -c "from plinth.peft.prefix import PrefixKV; p = PrefixKV(2, 4, 8); \
print([t.shape for t in p(3)])"

The prefixes plug into `Attention.prefix_kv` (the extension point in plinth.models.layers), which
puts them before the layer's keys and values and widens the mask. They carry no position: RoPE is
not applied to them and the real tokens keep positions 0, 1, ... (peft instead passes them as a
KV cache, which shifts the tokens' positions by P). Generation with a KV cache works unchanged:
the cache holds the real tokens only. `disable_adapters` takes the modules out of the attention
layers for its duration.

Init: small random keys and values (std 0.02). The first forward is then close to, not equal to,
the base model: each query gives the prefixes some attention weight, which mostly shrinks its
output. Equal random starts would be symmetric (every prefix slot would get the same gradient
forever), so values are not all zero. Parameters: 2 * P * n_kv_heads * head_dim per layer.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixKV(nn.Module):
    """Learned keys and values (K, P, E) of one attention layer; call with the batch size."""

    adapter_names = ("key", "value")

    def __init__(
        self, n_kv_heads: int, length: int, head_dim: int, *, device=None, dtype=None,
        std: float = 0.02,
    ):
        super().__init__()
        shape = (n_kv_heads, length, head_dim)
        self.key = nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * std)
        self.value = nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * std)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, K, P, E) x2
        k, v = self.key, self.value
        return k.expand(batch_size, *k.shape), v.expand(batch_size, *v.shape)

    def extra_repr(self) -> str:
        k, p, e = self.key.shape
        return f"n_kv_heads={k}, length={p}, head_dim={e}"
