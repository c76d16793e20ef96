"""Task heads on a pretrained model: pooling and a linear layer per task.

Heads live in `model.heads` (a ModuleDict keyed by task name), so the base keeps its parameter
names and a fine-tuned state dict is the base's plus `heads.<task>.weight/bias` (plus adapters).
Pooling turns hidden states (B, T, D) into one vector per sequence:
- mean: average over real tokens (attention_mask) — what sentence-embedding encoders such as
  all-MiniLM are trained for;
- cls: the first token (BERT's [CLS]);
- last: the last real token — in a causal decoder the only one that has read the whole input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plinth.models import unwrap


def seeded_head(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """A task head initialised from its own seed (independent of how many heads exist)."""
    head = nn.Linear(in_features, out_features)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
        head.bias.zero_()
    return head


def resolve_pooling(pooling: str, arch: str) -> str:
    if pooling != "auto":
        return pooling
    return "last" if arch == "decoder" else "mean"


def add_heads(model: nn.Module, sizes: dict[str, int], seed: int) -> None:
    """Attach one linear head per task (name -> outputs), trainable, after any method."""
    base = unwrap(model)
    device = next(base.parameters()).device
    heads = nn.ModuleDict(
        {
            name: seeded_head(base.cfg.d_model, n, seed + 101 * (i + 1)).to(device)
            for i, (name, n) in enumerate(sizes.items())
        }
    )
    base.heads = heads


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    base = unwrap(model)
    if base.cfg.arch == "decoder":  # right padding: causal attention never reads it
        return base.encode(input_ids)
    if base.cfg.arch == "encoder":
        return base.encode(input_ids, attention_mask)
    raise ValueError(f"task heads need a decoder or an encoder, not {base.cfg.arch}")


def pool(h: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, D) -> (B, D), see the module doc."""
    if how == "cls":
        return h[:, 0]
    if how == "last":
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    m = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def head_outputs(model: nn.Module, batch, task: str, pooling: str) -> torch.Tensor:
    """Logits (B, num_labels) or predictions (B, 1) of `task`'s head on `batch`."""
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return unwrap(model).heads[task](pool(h, batch["attention_mask"], pooling))


def head_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "regression":
        return F.mse_loss(out.squeeze(-1).float(), target.float())
    return F.cross_entropy(out.float(), target)
