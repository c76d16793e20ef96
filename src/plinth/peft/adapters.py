"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after the attention output and
after the MLP output of every block.

    python -c "from torch import nn; from plinth.peft.adapters import BottleneckAdapter; \
print(BottleneckAdapter(nn.Linear(64, 64), bottleneck=8))"

The adapter sits on the layer that writes the sub-block's output (`o_proj` of attention,
`down_proj` of the MLP): y = o + up(gelu(down(dropout(o)))) with o the original output. `up` is
zero-initialised, so the model starts exactly as the base; `down` has nn.Linear's default init so
the first steps already move `up`. Each adapter costs ~2 * d_model * bottleneck parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plinth.peft.wrap import WrappedLinear


class BottleneckAdapter(WrappedLinear):
    """A linear layer followed by a residual bottleneck MLP (adapter_down -> GELU -> adapter_up)."""

    adapter_names = ("adapter_down", "adapter_up")

    def __init__(self, base: nn.Linear, bottleneck: int, dropout: float = 0.0):
        super().__init__(base)
        p, d = base.weight, self.out_features
        self.adapter_down = nn.Linear(d, bottleneck, device=p.device, dtype=p.dtype)
        self.adapter_up = nn.Linear(bottleneck, d, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bottleneck = bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)  # (..., out)
        if not self.enabled:
            return y
        return y + self.adapter_up(F.gelu(self.adapter_down(self.adapter_dropout(y))))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bottleneck={self.bottleneck}"
