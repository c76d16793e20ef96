"""The `hardware`, `distributed`, `inference` and `compress` sections: where and how a
model runs.

    plinth config explain hardware
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from plinth.config.sections.base import SEED_MAX, Section


def _dtype_spellings(data, keys: tuple[str, ...]):
    """torch's dtype names (bfloat16, float32, ...) accepted as bf16, fp32, ... in `keys`."""
    from plinth.config.dtypes import canonical_dtype

    if isinstance(data, dict):
        data = {k: canonical_dtype(v) if k in keys else v for k, v in data.items()}
    return data

# ------------------------------------------------------------------------------------ hardware


class HardwareConfig(Section):
    """Where and how fast the model runs: device, precision, memory savers."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Compute device. auto picks cuda when a GPU is visible, else cpu."""

    @model_validator(mode="before")
    @classmethod
    def _dtypes(cls, data):
        return _dtype_spellings(data, ("precision",))

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Numeric precision of compute. bf16 autocast halves activation memory and is much faster
    on GPUs from A100 on, at a small accuracy cost; fp16 needs loss scaling (older GPUs); fp32
    is exact and the only fast choice on most CPUs."""

    activation_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: ~30% more compute
    for far less activation memory. Turn on when a larger micro-batch or model must fit."""

    compile: bool = False
    """Compile the model with torch.compile: faster steps after a one-off compile delay
    (tens of seconds). Worth it for runs longer than a few minutes."""

    num_workers: int = Field(0, ge=0, le=64)
    """Data-loader worker processes. Reading memory-mapped shards is cheap, so 0 (in-process)
    is usually fastest; raise it if data loading shows up in the step time."""


# --------------------------------------------------------------------------------- distributed


class DistributedConfig(Section):
    """Multi-process training under torchrun: how the model is replicated or sharded.

    Launch with `torchrun --nproc_per_node=N -m plinth pretrain CONFIG`; rank and world size
    come from torchrun's environment. A single process ignores this section."""

    strategy: Literal["auto", "none", "ddp", "fsdp", "hsdp"] = "auto"
    """ddp replicates the model on every rank and all-reduces gradients (fits when one device
    holds weights + gradients + optimizer state); fsdp (FSDP2) shards parameters, gradients and
    optimizer state across all ranks (ZeRO-3: for models that do not fit one device); hsdp
    shards within groups of `shard_size` ranks (usually one node) and replicates across groups,
    keeping the heavy traffic on the fast intra-node links. auto: ddp when world size > 1."""

    shard_size: int | None = Field(None, ge=1)
    """hsdp only: ranks that share one copy of the model; must divide the world size. None
    means the ranks of one node (torchrun's LOCAL_WORLD_SIZE)."""

    @model_validator(mode="before")
    @classmethod
    def _dtypes(cls, data):
        return _dtype_spellings(data, ("param_dtype", "reduce_dtype"))

    param_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """fsdp/hsdp mixed precision: dtype the gathered parameters compute in. auto follows
    hardware.precision. The sharded master weights and the optimizer stay fp32."""

    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """fsdp/hsdp mixed precision: dtype of the gradient reduce-scatter. fp32 is exact; bf16
    halves the traffic at a small accuracy cost."""

    reshard_after_forward: bool = True
    """fsdp/hsdp: free gathered parameters after each block's forward and gather them again in
    backward (ZeRO-3, least memory). false keeps them until backward (ZeRO-2-like, less
    communication, more memory)."""

    bucket_mb: int = Field(25, ge=1, le=65_536)
    """ddp: gradient bucket size in MB; each full bucket is all-reduced while backward goes on."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend. auto: nccl on GPUs, gloo on CPU."""

    timeout_s: int = Field(600, ge=10, le=30 * 86_400)
    """Seconds a collective waits for the other ranks before failing. When a rank dies the
    others stop with a clear error after at most this long instead of hanging (torchrun usually
    stops them sooner)."""


# ----------------------------------------------------------------------------------- inference


class InferenceConfig(Section):
    """Text generation defaults, used by generate, chat, serve and training samples."""

    temperature: float = Field(0.8, ge=0)
    """Sampling temperature; 0 means greedy. Higher is more diverse and more error-prone."""

    top_k: int | None = Field(50, ge=1)
    """Sample only from the k most likely tokens; None disables. Cuts off the long tail."""

    top_p: float | None = Field(0.95, gt=0, le=1)
    """Nucleus sampling: smallest token set with this total probability; None disables."""

    repetition_penalty: float = Field(1.0, gt=0)
    """Divide logits of tokens already present (>1 discourages repeats; 1.0 disables)."""

    beam_width: int = Field(1, ge=1, le=64)
    """Beams for beam search; 1 means sampling/greedy. Beams help translation/summarisation,
    rarely open-ended chat."""

    max_new_tokens: int = Field(128, ge=1)
    """Upper bound on generated tokens per prompt."""

    batch_size: int = Field(8, ge=1)
    """Prompts decoded together. Larger uses the device better and needs more KV-cache memory."""

    stop: list[str] = Field(default_factory=list)
    """Strings that end generation when produced (not included in the output)."""

    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    """Seed for reproducible sampling (0 .. 2**32-1); None draws fresh randomness."""


# ------------------------------------------------------------------------------------ compress


class CompressConfig(Section):
    """Making a trained model smaller and cheaper to serve."""

    quantization: Literal["none", "int8", "int4"] = "none"
    """Weight-only quantisation. int8 halves memory vs bf16 with negligible loss; int4 quarters
    it with a measurable loss (check perplexity)."""

    group_size: int = Field(128, ge=8, le=65_536)
    """Weights sharing one quantisation scale (int4). Smaller groups are more accurate and use
    a little more memory."""

    pruning: Literal["none", "magnitude", "structured"] = "none"
    """Weight pruning method. magnitude zeroes the smallest weights (unstructured); structured
    removes whole MLP channels (real speed-ups on any hardware)."""

    sparsity: float = Field(0.0, ge=0, lt=1)
    """Fraction of weights (or channels) pruned. Quality drops quickly beyond ~0.5."""

    distill_teacher: str | None = None
    """Run or checkpoint directory of a teacher model to distil into this (smaller) model."""

    distill_temperature: float = Field(2.0, gt=0)
    """Softmax temperature for distillation; higher transfers more of the teacher's ranking of
    unlikely tokens."""

    distill_alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the distillation loss vs the ordinary loss on labels."""
