"""The common shape of every parameter-efficient layer: a module that takes the place of an
`nn.Linear` and keeps its `weight` and `bias` under the same names (the same Parameter objects,
so tied weights stay tied and base checkpoints load unchanged), plus small trainable parts.

    python -c "from torch import nn; from plinth.peft.wrap import *; \
print(dict(WrappedLinear(nn.Linear(4, 3)).named_parameters()).keys())"

`enabled` switches the extra parts off (see `plinth.peft.disable_adapters`); `adapter_names`
lists the attributes that belong to the method, which is how saving and freezing find them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WrappedLinear(nn.Module):
    """A linear layer's weight and bias at their old names; subclasses add the method's parts."""

    adapter_names: tuple[str, ...] = ()

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: names, ties and checkpoints unchanged
        self.register_parameter("bias", base.bias)
        self.enabled = True

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to a method (by the layers' `adapter_names`), by full name."""
    out = {}
    for mname, m in model.named_modules():
        for attr in getattr(m, "adapter_names", ()):
            part = getattr(m, attr, None)
            if isinstance(part, nn.Parameter):
                out[f"{mname}.{attr}".lstrip(".")] = part
            elif isinstance(part, nn.Module):
                for pname, p in part.named_parameters():
                    out[f"{mname}.{attr}.{pname}".lstrip(".")] = p
    return out
