"""Transformer models built from a `ModelConfig`: decoder, encoder and encoder-decoder.

    python -c "from plinth.config.schema import ModelConfig as C; from plinth.models import *; \
print(build_model(C(n_layers=2, d_model=64, n_heads=2)))"

Every model has `.cfg`, `num_params()` (equal to `cfg.param_count()`) and `flops_per_token()`
(for MFU). Model code is single-device: parallelism, compile and activation checkpointing are
applied from outside.
"""

from __future__ import annotations

from torch import nn

from plinth.config.schema import ModelConfig
from plinth.models.decoder import Decoder
from plinth.models.encoder import Encoder
from plinth.models.encoder_decoder import EncoderDecoder
from plinth.models.layers import KVCache

MODELS: dict[str, type[nn.Module]] = {
    "decoder": Decoder,
    "encoder": Encoder,
    "encoder_decoder": EncoderDecoder,
}


def build_model(cfg: ModelConfig) -> Decoder | Encoder | EncoderDecoder:
    """The model `cfg.arch` names, with freshly initialised weights (seed torch first)."""
    return MODELS[cfg.arch](cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


__all__ = ["MODELS", "Decoder", "Encoder", "EncoderDecoder", "KVCache", "build_model", "unwrap"]
