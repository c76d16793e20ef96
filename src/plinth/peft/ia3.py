"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper"):
learned vectors that rescale the keys, the values and the MLP's intermediate activation.

    python -c "from torch import nn; from plinth.peft.ia3 import IA3Linear; \
print(IA3Linear(nn.Linear(64, 16), feedforward=False))"

On `k_proj` and `v_proj` the vector scales the output (one value per key/value feature); on
`down_proj` it scales the input, i.e. the MLP's intermediate activation. Vectors start at 1, so
the model starts exactly as the base; the method trains ~(2 * kv_dim + ffn_dim) values per block,
the fewest of all. Parameter name `ia3_l`, as peft's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plinth.peft.wrap import WrappedLinear


class IA3Linear(WrappedLinear):
    """A linear layer whose output (or, with `feedforward`, input) is scaled by `ia3_l`."""

    adapter_names = ("ia3_l",)

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__(base)
        self.feedforward = feedforward
        n = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base_forward(x)
        if self.feedforward:
            return F.linear(x * self.ia3_l.to(x.dtype), self.weight, self.bias)  # (..., in) scaled
        y = self.base_forward(x)
        return y * self.ia3_l.to(y.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the scale into the weight (and, for output scaling, the bias)."""
        if self.merged:
            return
        if self.feedforward:
            self.weight.mul_(self.ia3_l[None, :])
        else:
            self.weight.mul_(self.ia3_l[:, None])
            if self.bias is not None:
                self.bias.mul_(self.ia3_l)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.feedforward:
            self.weight.div_(self.ia3_l[None, :])
        else:
            self.weight.div_(self.ia3_l[:, None])
            if self.bias is not None:
                self.bias.div_(self.ia3_l)
        self.merged = False

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else "output"
        return f"{super().extra_repr()}, scales the {where}"
