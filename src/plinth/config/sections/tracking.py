"""The `tracking` and `stability` sections: the run directory, logging and the guard.

    plinth config explain stability
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from plinth.config.sections.base import Section

# ------------------------------------------------------------------------------------ tracking


class TrackingConfig(Section):
    """Run directory, logging cadence and metric sinks."""

    run_name: str | None = None
    """Name of the run directory under output_dir; None uses the recipe name. One plain
    directory name: no `/`, `\\` or `..` (it may not point outside output_dir)."""

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        bad = (
            not v.strip() or v == "." or "/" in v or "\\" in v or ".." in v or v.startswith("~")
            or any(ord(c) < 32 for c in v) or len(v) > 200
        )
        if bad:
            raise ValueError(
                "must be one plain directory name inside tracking.output_dir (no '/', '\\', "
                "'..', leading '~' or control characters, at most 200 characters); to write "
                "elsewhere, set tracking.output_dir"
            )
        return v

    output_dir: str = "runs"
    """Parent directory of run directories; `plinth runs` lists what is under it. Point it at
    fast local disk with room for checkpoints."""

    log_every: int = Field(10, ge=1)
    """Optimizer steps between metric records. Smaller is finer curves at slightly more
    overhead."""

    eval_every: int = Field(200, ge=1)
    """Steps between validation evaluations (also at the end)."""

    eval_batches: int = Field(20, ge=1)
    """Micro-batches per validation evaluation. More is a less noisy estimate, more time."""

    eval_tasks: list[str] = Field(default_factory=list)
    """Evaluation tasks scored during training (decoders), like `plinth eval --tasks`: built-in
    names (arithmetic, capitals, ...), `suite`, or task YAML paths. Logged as `eval/<task>/
    <metric>` next to validation loss. Empty: none."""

    eval_tasks_every: int | None = Field(None, ge=1)
    """Steps between task evaluations (also at the end); None: every eval_every."""

    eval_tasks_limit: int | None = Field(50, ge=1)
    """Examples scored per task each time (the first N: the same ones every time). None: all."""

    checkpoint_every: int = Field(500, ge=1)
    """Steps between checkpoints (also at the end). More frequent: less lost work on a crash,
    more disk and time."""

    keep_last: int = Field(2, ge=1)
    """Checkpoints kept besides the best one; older ones are deleted."""

    sample_every: int = Field(500, ge=1)
    """Steps between text samples from the fixed prompts (decoder models)."""

    sample_prompts: list[str] = Field(default_factory=lambda: ["def ", "The "])
    """Fixed prompts sampled during training, so samples compare across steps and runs; empty:
    no samples."""

    sinks: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"]
    )
    """Where metrics go. jsonl (metrics.jsonl in the run directory) is always written; the
    others need the `track` extra."""


# ----------------------------------------------------------------------------------- stability


class StabilityConfig(Section):
    """Stability guard run every optimizer step: non-finite values, spikes, rollback, stalls."""

    enabled: bool = True
    """Check every step's loss and gradient norm. Costs microseconds per step (it only looks at
    floats the loop already has); turn off only to reproduce how unguarded training behaves."""

    on_nonfinite: Literal["skip", "halt"] = "skip"
    """What a NaN/Inf loss or gradient norm does. `skip` drops that update (weights stay finite)
    and goes on, so one bad batch costs one step; `halt` stops at once so you can inspect the
    state. Repeated non-finite steps count toward the rollback rule either way."""

    spike_metrics: list[Literal["loss", "grad_norm"]] = Field(
        default_factory=lambda: ["loss", "grad_norm"]
    )
    """Metrics watched for upward spikes (grad_norm is the pre-clip norm). Gradient-norm spikes
    often come a few steps before loss spikes; drop grad_norm if its natural swings (e.g. right
    after warmup) cause false alarms."""

    on_spike: Literal["log", "skip"] = "skip"
    """What a spike does. `skip` drops the update, so one poisoned batch cannot move the weights;
    `log` only records the event (use it to measure how often spikes happen before acting)."""

    window: int = Field(128, ge=8, le=100_000)
    """Recent steps whose mean and standard deviation define "normal" for spike detection.
    Longer windows are steadier but adapt more slowly to a loss that is still falling fast."""

    min_history: int = Field(64, ge=2)
    """Finite values a window must hold before spikes are checked (the first steps of a run and
    of a warmup are naturally wild). Must not exceed window; lower it for very short runs."""

    z_threshold: float = Field(6.0, gt=0)
    """A value more than this many standard deviations above the window mean is a spike
    (one-sided). Lower catches more real spikes and more noise; 6 almost never fires on a
    healthy run."""

    blowup_count: int = Field(4, ge=1)
    """Anomalies (spikes or non-finite steps) within blowup_steps that count as a persistent
    blow-up and trigger a rollback to the last good checkpoint. Lower reacts sooner and rolls
    back more often."""

    blowup_steps: int = Field(32, ge=1)
    """Length in steps of the sliding span in which blowup_count anomalies mean a blow-up.
    Widen it to catch slower divergence; it should stay well below tracking.checkpoint_every
    times the number of checkpoints kept."""

    max_rollbacks: int = Field(3, ge=0)
    """Rollbacks allowed in one run; the next blow-up halts it. Bounds the compute spent
    retrying a run that keeps diverging (then lower the learning rate instead). 0 means halt
    on the first blow-up."""

    stall_fraction: float = Field(0.25, gt=0, lt=1)
    """Throughput (tokens/s) below this fraction of its recent median is reported as a stall
    (an event; training goes on). Raise it to catch milder slowdowns (slow disk, throttling)."""

    stall_window: int = Field(32, ge=4)
    """Logged throughput values whose median is the stall reference. Longer is steadier but
    takes longer to accept a new normal after a lasting change (e.g. a resume on other
    hardware)."""

    @model_validator(mode="after")
    def _check_history(self) -> StabilityConfig:
        if self.min_history > self.window:
            raise ValueError(
                f"stability.min_history ({self.min_history}) exceeds stability.window "
                f"({self.window}): the window can never hold that many values. Lower "
                "min_history or raise window."
            )
        return self
