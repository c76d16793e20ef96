"""The `pretrain` and `optim` sections: how long to train and how to optimise.

    plinth config explain optim
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from plinth.config.sections.base import Section

# ------------------------------------------------------------------------------------ pretrain


class PretrainConfig(Section):
    """Pretraining from scratch: objective and how long to train."""

    objective: Literal["auto", "clm", "mlm", "span"] = "auto"
    """Training objective. clm (next-token) for decoders, mlm (masked LM) for encoders, span
    (T5 span corruption) for encoder-decoders; auto picks the one that fits model.arch."""

    mask_ratio: float = Field(0.15, gt=0, lt=1)
    """Fraction of tokens masked (mlm) or corrupted (span). 0.15 is BERT/T5's; higher (0.3-0.4)
    can train faster for larger encoders."""

    mean_span_length: float = Field(3.0, ge=1)
    """span objective: average length of corrupted spans (T5 uses 3)."""

    max_steps: int | None = Field(1000, ge=1)
    """Optimizer steps to train for. The run ends at whichever of max_steps, max_tokens or
    max_epochs comes first; None disables this bound."""

    max_tokens: int | None = Field(None, ge=1)
    """Training tokens to consume; None disables. ~20 tokens per parameter is compute-optimal
    (Chinchilla); small models benefit from far more."""

    max_epochs: float | None = Field(None, gt=0)
    """Passes over the training split; None disables. More than a few epochs overfits."""

    @model_validator(mode="after")
    def _some_bound(self) -> PretrainConfig:
        if self.max_steps is None and self.max_tokens is None and self.max_epochs is None:
            raise ValueError(
                "set at least one of max_steps, max_tokens or max_epochs, or the run never ends"
            )
        return self


# --------------------------------------------------------------------------------------- optim


class EarlyStopConfig(Section):
    """Stop training when validation stops improving."""

    metric: str = "val_loss"
    """Validation metric to watch (lower is better for losses)."""

    patience: int | None = Field(None, ge=1)
    """Evaluations without improvement before stopping; None disables early stopping."""

    min_delta: float = Field(0.0, ge=0)
    """Improvement smaller than this does not reset the patience counter."""


class OptimConfig(Section):
    """Optimizer, learning-rate schedule, batch size and regularisation."""

    name: Literal["adamw", "adam", "sgd", "muon"] = "adamw"
    """Optimizer. adamw is the safe default; muon (orthogonalised momentum for 2-D hidden
    weights, AdamW for the rest) often reaches a loss faster in pretraining; sgd with momentum
    mainly for baselines; adam applies decay as L2 (rarely what you want)."""

    lr: float = Field(1e-3, gt=0, le=10)
    """Peak learning rate. Too high diverges, too low wastes compute. Smaller models tolerate
    higher rates (~1e-3 at 10M params, ~3e-4 at 1B); fine-tuning uses ~1e-5 full, ~1e-4 LoRA."""

    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.95,
    )
    """Adam momentum coefficients, each in [0, 1) (torch refuses others). beta2=0.95 reacts
    faster to gradient changes and is more stable for LLM pretraining than 0.999."""

    eps: float = Field(1e-8, gt=0, le=1)
    """Adam epsilon; raise (1e-6) if low-precision training shows instability."""

    weight_decay: float = Field(0.1, ge=0, le=10)
    """Decoupled weight decay on matrices (never on norms, biases and embeddings). 0.1 is
    standard for pretraining; 0-0.01 for fine-tuning."""

    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum for sgd and for muon's hidden-weight update."""

    schedule: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    """Learning-rate shape after warmup. cosine decays smoothly to min_lr; wsd (warmup-stable-
    decay) holds the peak and decays in the final decay_frac, so a run can be extended; linear
    decays linearly; constant never decays."""

    warmup_steps: int = Field(100, ge=0)
    """Steps of linear warmup from 0 to lr. Prevents early divergence with Adam; ~1-5% of the
    run."""

    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr for decaying schedules."""

    decay_frac: float = Field(0.2, gt=0, le=1)
    """wsd only: fraction of the run spent in the final decay."""

    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (the pre-clip norm is logged). 1.0 is
    standard; None disables clipping."""

    global_batch: int = Field(32, ge=1)
    """Batch per optimizer step across all devices, in `batch_unit`s. Larger: smoother
    gradients and better hardware use, fewer steps per token; memory is bounded by micro_batch
    since the rest is gradient accumulation."""

    batch_unit: Literal["sequences", "tokens"] = "sequences"
    """Unit of global_batch. `tokens` keeps the batch fixed when max_seq_len changes (LLM
    papers quote batch sizes in tokens)."""

    micro_batch: int = Field(8, ge=1)
    """Sequences per forward/backward pass on each device. Raise until memory is full; the
    global batch is reached by accumulating micro-batches."""

    z_loss: float = Field(0.0, ge=0)
    """Weight of the z-loss (log-sum-exp of logits squared, PaLM). ~1e-4 keeps logits from
    drifting and stabilises large runs; 0 disables."""

    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    """Early stopping on a validation metric (off unless patience is set)."""

    def sequences_per_step(self, seq_len: int) -> int:
        """Global batch in sequences, whichever unit it was given in."""
        if self.batch_unit == "sequences":
            return self.global_batch
        if self.global_batch % seq_len:
            raise ValueError(
                f"optim.global_batch={self.global_batch} tokens is not a multiple of the "
                f"sequence length {seq_len}; use {max(1, self.global_batch // seq_len) * seq_len}"
            )
        return self.global_batch // seq_len

    def accum_steps(self, seq_len: int, world_size: int = 1) -> int:
        """Micro-batches each device accumulates per optimizer step (call `fit_world` first to
        lower a micro_batch that does not divide the global batch)."""
        seqs = self.sequences_per_step(seq_len)
        per_step = self.micro_batch * world_size
        if seqs % per_step:
            raise ValueError(
                f"global batch of {seqs} sequences is not a multiple of micro_batch "
                f"({self.micro_batch}) x world size ({world_size}) = {per_step}; set "
                f"optim.global_batch to a multiple of {per_step}"
            )
        return seqs // per_step

    def fit_world(self, seq_len: int, world_size: int = 1) -> str | None:
        """Make micro_batch x world_size divide the global batch by lowering micro_batch to the
        largest divisor of the per-device batch: the global batch, and so the optimizer's math,
        is unchanged (more accumulation steps instead). Returns a one-line note when micro_batch
        changed, None when it already fitted; raises ValueError when no micro-batch keeps the
        global batch (it does not split evenly over the devices)."""
        seqs = self.sequences_per_step(seq_len)
        if seqs % (self.micro_batch * world_size) == 0:
            return None
        if seqs % world_size:
            up = -(-seqs // world_size) * world_size
            example = str(up) if self.batch_unit == "sequences" else f"{up * seq_len} tokens"
            raise ValueError(
                f"global batch of {seqs} sequences does not split evenly over {world_size} "
                "processes, so no micro_batch keeps it; set optim.global_batch to a multiple "
                f"of {world_size} sequences (e.g. {example}), or launch a number of processes "
                f"that divides {seqs}"
            )
        per_device = seqs // world_size
        old = self.micro_batch
        micro = max(d for d in range(1, min(old, per_device) + 1) if per_device % d == 0)
        self.micro_batch = micro
        steps = per_device // micro
        return (
            f"optim.micro_batch lowered from {old} to {micro}: {world_size} x {micro} sequences "
            f"x {steps} accumulation step{'s' if steps > 1 else ''} = the global batch of "
            f"{seqs} sequences (same optimizer math; set optim.micro_batch to choose the split)"
        )
