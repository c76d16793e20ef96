"""The typed configuration: one section per stage of a model's life, every field documented.

    plinth config explain            # list the sections
    plinth config explain optim.lr   # doc, type, default, current value and its source

Every field carries a docstring (what it does, its trade-off, when to change it); pydantic
turns those into field descriptions and a test fails for any field without one. Sections
forbid unknown keys, so a typo is an error with a suggestion, never a silently ignored value.
Cross-field rules live in `model_validator`s next to the fields they relate.

The sections live in `plinth.config.sections` (one module per stage); this module assembles
them into `Config` and is where the rest of plinth imports them from.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from plinth.config.sections.align import AlignConfig
from plinth.config.sections.base import SEED_MAX, Section
from plinth.config.sections.data import (
    DataConfig,
    DedupConfig,
    FilterConfig,
    SourceConfig,
    TokenizerConfig,
)
from plinth.config.sections.finetune import FinetuneConfig, TaskSpec
from plinth.config.sections.model import ModelConfig
from plinth.config.sections.runtime import (
    CompressConfig,
    DistributedConfig,
    HardwareConfig,
    InferenceConfig,
)
from plinth.config.sections.tracking import StabilityConfig, TrackingConfig
from plinth.config.sections.train import EarlyStopConfig, OptimConfig, PretrainConfig

__all__ = [
    "OBJECTIVE_FOR_ARCH",
    "AlignConfig",
    "CompressConfig",
    "Config",
    "DataConfig",
    "DedupConfig",
    "DistributedConfig",
    "EarlyStopConfig",
    "FilterConfig",
    "FinetuneConfig",
    "HardwareConfig",
    "InferenceConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "Section",
    "SourceConfig",
    "StabilityConfig",
    "TaskSpec",
    "TokenizerConfig",
    "TrackingConfig",
]

# -------------------------------------------------------------------------------------- config


class Config(Section):
    """Everything a plinth run needs; every value can be set in YAML or as key=value."""

    preset: str | None = None
    """Named starting point applied before your YAML (see `plinth config presets`), e.g.
    `small` for a ~125M decoder or `ref-cpu-decoder` for the CPU benchmark workload."""

    seed: int = Field(1337, ge=0, le=SEED_MAX)
    """Seed for weights, data order, masking and dropout. Same seed + config = same run.
    0 .. 2**32-1 (what numpy's generators accept)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """Architecture (see `plinth config explain model`)."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Data preparation and loading (see `plinth config explain data`)."""

    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """Pretraining objective and length (see `plinth config explain pretrain`)."""

    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Fine-tuning method and task head (see `plinth config explain finetune`)."""

    align: AlignConfig = Field(default_factory=AlignConfig)
    """Preference tuning, reward models, RL from rewards (see `plinth config explain align`)."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer, schedule and batch (see `plinth config explain optim`)."""

    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    """Device, precision and memory savers (see `plinth config explain hardware`)."""

    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Multi-process strategy under torchrun (see `plinth config explain distributed`)."""

    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    """Generation defaults (see `plinth config explain inference`)."""

    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Quantisation, pruning, distillation (see `plinth config explain compress`)."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Run directory and logging (see `plinth config explain tracking`)."""

    stability: StabilityConfig = Field(default_factory=StabilityConfig)
    """Non-finite and spike guard, rollback, stall detection (`plinth config explain
    stability`)."""

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        objective, arch = self.pretrain.objective, self.model.arch
        if objective != "auto" and objective != OBJECTIVE_FOR_ARCH[arch]:
            raise ValueError(
                f"pretrain.objective={objective} does not fit model.arch={arch}; use "
                f"pretrain.objective={OBJECTIVE_FOR_ARCH[arch]} (or auto)"
            )
        tok = self.data.tokenizer
        if tok.path is None and tok.vocab_size not in (None, self.model.vocab_size):
            raise ValueError(
                f"data.tokenizer.vocab_size ({tok.vocab_size}) differs from model.vocab_size "
                f"({self.model.vocab_size}): the model's embedding must match the tokenizer it "
                "trains; set only model.vocab_size (the tokenizer follows it)"
            )
        return self

    @property
    def objective(self) -> str:
        """The pretraining objective after resolving `auto` from the architecture."""
        o = self.pretrain.objective
        return OBJECTIVE_FOR_ARCH[self.model.arch] if o == "auto" else o

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.data.tokenizer.vocab_size or self.model.vocab_size


OBJECTIVE_FOR_ARCH = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span"}
