"""A rough training-memory estimate, to refuse a model that cannot fit before wasting time.

Per parameter in fp32 with AdamW: 4 bytes weights + 4 gradients + 8 optimizer moments = 16
bytes (SGD: 12). Activations per layer per token are ~ (34 * d_model + 5 * n_heads * seq) bytes
at 16-bit for a standard block (Korthikanti et al. 2022; doubled for fp32), plus the logits.
`plinth plan` prints this breakdown per device for a given number of devices and strategy.
"""

from __future__ import annotations

import torch

from plinth.config.presets import PRESETS
from plinth.config.schema import Config, ModelConfig
from plinth.errors import UsageError


def memory_per_device(
    cfg: Config, micro_batch: int | None = None, devices: int = 1, strategy: str = "none"
) -> dict[str, float]:
    """Bytes per device: weights, gradients, optimizer state, activations, logits.

    FSDP shards weights, gradients and optimizer state across `devices`; activation
    checkpointing keeps only each block's input plus one block's activations."""
    m = cfg.model
    n = m.param_count()
    shard = devices if strategy in ("fsdp", "hsdp") else 1
    act_bytes = 2 if cfg.hardware.precision in ("bf16", "fp16") else 4
    tokens = (micro_batch or cfg.optim.micro_batch) * m.max_seq_len
    layers = m.n_layers + ((m.n_decoder_layers or m.n_layers) if m.arch == "encoder_decoder" else 0)
    full_layer = tokens * (34 * m.d_model + 5 * m.n_heads * m.max_seq_len) * act_bytes / 2
    if cfg.hardware.activation_checkpointing:
        activations = layers * tokens * m.d_model * act_bytes + full_layer
    else:
        activations = layers * full_layer
    optim_bytes = {"adamw": 8, "adam": 8, "sgd": 4, "muon": 8}[cfg.optim.name]
    return {
        "weights": 4.0 * n / shard,
        "gradients": 4.0 * n / shard,
        "optimizer": optim_bytes * n / shard,
        "activations": activations,
        "logits": tokens * m.vocab_size * 4 * 2,  # fp32 logits and their gradient
    }


def available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


def check_fits(cfg: Config, device: torch.device, available: float | None = None) -> None:
    """Raise a clear error when the estimate exceeds what the device has free."""
    est = memory_per_device(cfg)
    need = sum(est.values())
    have = available_bytes(device) if available is None else available
    if need <= 0.9 * have:
        return
    gib = 2**30
    fits = [
        name
        for name, p in PRESETS.items()
        if p.nominal_params
        and 16
        * ModelConfig(
            **{k.split(".", 1)[1]: v for k, v in p.values.items() if k.startswith("model.")}
        ).param_count()
        < 0.5 * have
    ]
    breakdown = ", ".join(f"{k} {v / gib:.1f} GiB" for k, v in est.items())
    raise UsageError(
        f"this model will not fit: {cfg.model.param_count() / 1e6:,.1f}M parameters need about "
        f"{need / gib:.1f} GiB to train ({breakdown}) but {device.type} has {have / gib:.1f} GiB "
        f"free. Use a smaller model (presets that fit: {', '.join(fits) or 'none'}), lower "
        "optim.micro_batch or model.max_seq_len, or a device with more memory."
    )
