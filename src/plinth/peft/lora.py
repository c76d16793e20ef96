"""LoRA, DoRA and QLoRA: a trainable low-rank update on top of a frozen linear layer.

    python -c "from torch import nn; from plinth.peft.lora import LoRALinear; \
m = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8); print(m, sorted(m.state_dict()))"

LoRA (Hu et al. 2021): y = W x + b + (alpha / r) * B A dropout(x), with A (r, in) initialised
like peft (Kaiming-uniform, a = sqrt(5)) and B (out, r) zero, so training starts from exactly the
base model. Only A and B train: r * (in + out) values instead of in * out. Without dropout the
layer runs as one autograd function (`lora_linear`) that adds the update into the base product
and the update's input gradient into the base's (fewer passes over the outputs than separate
modules: a few percent less block time on CPU) and keeps no 16-bit weight copies under autocast.

DoRA (Liu et al. 2024, as peft's use_dora): the updated weight W' = W + (alpha / r) B A is split
into a direction and a learned magnitude per output row, m * W' / ||W'||. m starts at ||W|| (so
the layer starts unchanged) and the norm is treated as a constant in backward (the paper's
section 4.3), which is what peft does and keeps memory near LoRA's.

QLoRA (Dettmers et al. 2023): the frozen W is stored as 4-bit NF4 (`plinth.peft.nf4`) in the
buffers `weight_nf4` and `weight_absmax` and dequantised for each matrix multiply; LoRA trains on
top in full precision. A state dict with the dense `weight` (a base checkpoint) still loads: the
layer quantises it.

The module keeps the base layer's `weight`/`bias` names (state-dict keys unchanged) and adds
`lora_A.weight`, `lora_B.weight` (and `lora_magnitude_vector` for DoRA), the names peft uses.
`merge()` folds the update into `weight` for inference (one matmul, no adapter cost) and
`unmerge()` takes it out again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plinth.errors import NotSupportedError
from plinth.models.kernels import autocast_off, compute_dtype
from plinth.peft import nf4
from plinth.peft.wrap import WrappedLinear


class LoRALinear(WrappedLinear):
    """A linear layer with a low-rank update (DoRA with `dora=True`, NF4 base with `quantize`)."""

    adapter_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        dora: bool = False,
        quantize: bool = False,
        scaling: float | None = None,
    ):
        super().__init__(base)
        self.rank, self.alpha, self.dora, self.quantized = rank, alpha, dora, quantize
        self.scaling = alpha / rank if scaling is None else scaling  # rsLoRA: alpha / sqrt(r)
        p = base.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=p.device, dtype=p.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=p.device, dtype=p.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        if quantize:
            q = nf4.quantize(p)
            del self.weight  # the dense copy goes: the model keeps only the 4-bit codes
            self.register_buffer("weight_nf4", q.codes)
            self.register_buffer("weight_absmax", q.absmax)
            self.weight_shape, self.weight_dtype = p.shape, p.dtype
        self.lora_magnitude_vector = (
            nn.Parameter(self.dense_weight(torch.float32).norm(dim=1).to(p.dtype)) if dora else None
        )
        self._merge_norm: torch.Tensor | None = None  # DoRA: ||W + BA|| at merge, for unmerge

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a dense base weight (a base checkpoint) loads into a 4-bit layer by quantising it
        key = prefix + "weight"
        if self.quantized and key in state_dict:
            q = nf4.quantize(state_dict.pop(key))
            state_dict[prefix + "weight_nf4"] = q.codes
            state_dict[prefix + "weight_absmax"] = q.absmax
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight (out, in) as a dense tensor (dequantised for QLoRA)."""
        if self.quantized:
            codes, absmax = self.weight_nf4, self.weight_absmax
            dtype = dtype or self.weight_dtype
            return nf4.dequantize_parts(codes, absmax, self.weight_shape, dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight, self.bias)
        y = nf4.nf4_linear(x, self.weight_nf4, self.weight_absmax, self.weight_shape)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The LoRA update (alpha / r) B A, (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in)
        if not self.enabled or self.merged:
            return self.base_forward(x)
        if not (self.dora or self.quantized) and isinstance(self.lora_dropout, nn.Identity):
            return lora_linear(
                x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling
            )
        y = self.base_forward(x)  # (..., out)
        xd = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(xd)) * self.scaling
        if not self.dora:
            return y + lora
        # DoRA as peft computes it: (m / ||W'|| - 1) * W xd + (m / ||W'||) * BA xd * scaling
        with torch.no_grad():
            norm = (self.dense_weight(torch.float32) + self.delta_weight().float()).norm(dim=1)
        scale = (self.lora_magnitude_vector / norm).to(y.dtype)  # (out,)
        dropped = self.training and isinstance(self.lora_dropout, nn.Dropout)
        wx = self.base_forward(xd) if dropped else y
        if self.bias is not None:
            wx = wx - self.bias.to(wx.dtype)
        return y + (scale - 1) * wx + scale * lora

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (forward then skips the adapter)."""
        if self.merged:
            return
        if self.quantized:
            raise NotSupportedError(
                "a QLoRA layer cannot be merged: its base weight is 4-bit, and merging would "
                "quantise the update away. Save the adapter (plinth.peft.save_adapter), load it "
                "onto the full-precision base model with load_adapter, and merge there."
            )
        w = self.weight.float()
        delta = self.delta_weight().float()
        if self.dora:
            norm = (w + delta).norm(dim=1)
            self._merge_norm = norm
            new = (self.lora_magnitude_vector.float() / norm)[:, None] * (w + delta)
        else:
            new = w + delta
        self.weight.copy_(new.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of `weight` again (exact up to floating-point rounding)."""
        if not self.merged:
            return
        w = self.weight.float()
        delta = self.delta_weight().float()
        if self.dora:
            w = w / (self.lora_magnitude_vector.float() / self._merge_norm)[:, None]
            self._merge_norm = None
        self.weight.copy_((w - delta).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        kind = "dora" if self.dora else "qlora" if self.quantized else "lora"
        return f"{super().extra_repr()}, {kind}, rank={self.rank}, scaling={self.scaling:g}"


# ----------------------------------------------------------------------- the fused LoRA product


def lora_linear(
    x: torch.Tensor,  # (..., in)
    weight: torch.Tensor,  # (out, in) frozen base
    bias: torch.Tensor | None,  # (out,)
    lora_a: torch.Tensor,  # (r, in)
    lora_b: torch.Tensor,  # (out, r)
    scaling: float,
) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T, as `LoRALinear` computes it without dropout, in the
    fewest passes over the (N, out) output: the update is added into the base product by one
    addmm (no separate update tensor, no scaling pass, no sum), and backward adds the update's
    input gradient into the base's (one (N, in) tensor instead of two and their sum). Autograd
    keeps x and the (N, r) hidden x A^T; weights are referenced, never copied (16-bit casts under
    autocast are temporaries, remade in backward). A frozen `weight` gets no gradient product."""
    dtype = compute_dtype(x)
    return _LoRALinear.apply(x.to(dtype), weight, bias, lora_a, lora_b, scaling, dtype)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        b = None if bias is None else bias.to(dtype)
        y = F.linear(x2, weight.to(dtype), b)  # (N, out)
        h = x2 @ lora_a.to(dtype).t()  # (N, r)
        y.addmm_(h, lora_b.to(dtype).t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scaling, ctx.dtype, ctx.has_bias = scaling, dtype, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_lb = None
        with autocast_off(grad.device.type):
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (N, out)
            x2 = x.reshape(-1, x.shape[-1])
            a = lora_a.to(dtype)
            gh = (g @ lora_b.to(dtype)).mul_(s)  # (N, r): the gradient of h, scaled
            if need_lb:
                grad_lb = (g.t() @ h).mul_(s).to(lora_b.dtype)  # (out, r)
            if need_a:
                grad_a = (gh.t() @ x2).to(lora_a.dtype)  # (r, in)
            if need_x:  # base and update in one (N, in) tensor
                grad_x = (g @ weight.to(dtype)).addmm_(gh, a).view(x.shape)
            if need_w:
                grad_w = (g.t() @ x2).to(weight.dtype)
            if need_b and ctx.has_bias:
                grad_bias = g.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None, None
