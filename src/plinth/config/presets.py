"""Named starting points: `preset: small` in YAML or `preset=small` on the command line.

A preset is a flat map of dotted keys applied above the defaults and below your YAML and
command line, so anything it sets can still be changed. Model-size presets follow the usual
parameter bands (nominal counts below are checked by a test to within 10%).

    plinth config presets
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    values: dict[str, Any] = field(default_factory=dict)
    nominal_params: int | None = None  # what the name promises, for model-size presets


# d_ff=None derives the MLP width from d_model, so a preset stays consistent when a user
# changes d_model on top of it; explicit widths copy well-known checkpoints' shapes.
def _decoder(n_layers, d_model, n_heads, d_ff, vocab, seq, n_kv_heads=None, tie=False, **extra):
    values = {
        "model.arch": "decoder",
        "model.n_layers": n_layers,
        "model.d_model": d_model,
        "model.n_heads": n_heads,
        "model.n_kv_heads": n_kv_heads,
        "model.d_ff": d_ff,
        "model.activation": "swiglu",
        "model.norm": "rmsnorm",
        "model.positional": "rope",
        "model.vocab_size": vocab,
        "model.max_seq_len": seq,
        "model.tie_embeddings": tie,
    }
    values.update(extra)
    return values


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            "~7M-parameter Llama-style decoder: trains on a laptop CPU in minutes",
            _decoder(4, 256, 4, None, 8192, 256),
            nominal_params=7_000_000,
        ),
        Preset(
            "small",
            "~125M decoder (GPT-2 small / SmolLM-135M band), 12 x 768, tied embeddings",
            _decoder(12, 768, 12, None, 50304, 1024, tie=True),
            nominal_params=125_000_000,
        ),
        Preset(
            "medium",
            "~350M decoder (GPT-2 medium band), 24 x 1024, tied embeddings",
            _decoder(24, 1024, 16, 2816, 50304, 2048, tie=True),
            nominal_params=350_000_000,
        ),
        Preset(
            "base",
            "~1B decoder (TinyLlama shape, 20 layers), grouped-query attention with 4 KV heads",
            _decoder(20, 2048, 32, 5632, 32000, 2048, n_kv_heads=4),
            nominal_params=1_000_000_000,
        ),
        Preset(
            "large",
            "~7B decoder (Llama-2-7B shape), 32 x 4096",
            _decoder(32, 4096, 32, 11008, 32000, 4096),
            nominal_params=7_000_000_000,
        ),
        Preset(
            "ref-cpu-decoder",
            "the CPU benchmark workload (DESIGN.md): 6 x 384 decoder, vocab 8192, seq 256, "
            "micro-batch 8, fp32, AdamW",
            _decoder(
                6,
                384,
                6,
                1536,
                8192,
                256,
                **{
                    "optim.name": "adamw",
                    "optim.micro_batch": 8,
                    "optim.global_batch": 8,
                    "optim.batch_unit": "sequences",
                    "hardware.precision": "fp32",
                },
            ),
            nominal_params=20_500_000,
        ),
    ]
}
