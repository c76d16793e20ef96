"""Where a job computes: the device from `hardware.device`, this process's place in the
torchrun world, and the parallel strategy, worked out once by the recipe and handed down.

    placement = Placement.resolve(cfg, DistEnv.from_environ())
    with autocast_context(cfg, placement.device):
        ...
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from plinth.config.schema import Config
from plinth.distributed.env import DistEnv, check_strategy, device_for
from plinth.errors import PlinthError


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.hardware.device
    if want == "cuda" and not torch.cuda.is_available():
        raise PlinthError(
            "hardware.device=cuda but no CUDA device is visible (torch.cuda.is_available() is "
            "False). Set hardware.device=auto to train on the CPU, or install a CUDA build of "
            "torch."
        )
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def autocast_context(cfg: Config, device: torch.device):
    """bf16/fp16 autocast where it helps; fp32 (no context) otherwise, see config checks."""
    precision = cfg.hardware.precision
    if precision == "fp32" or (precision == "fp16" and device.type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Placement:
    """This process's rank in the job, its device (cuda:LOCAL_RANK under torchrun) and the
    strategy (none | ddp | fsdp | hsdp) after refusing combinations that cannot work."""

    env: DistEnv = field(default_factory=DistEnv)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"

    @classmethod
    def resolve(cls, cfg: Config, env: DistEnv | None = None) -> Placement:
        env = env or DistEnv()
        device = device_for(cfg, env, resolve_device(cfg))
        return cls(env, device, check_strategy(cfg, env, device))

    @property
    def sharded(self) -> bool:
        """Weights split over ranks: every rank takes part in each forward."""
        return self.strategy in ("fsdp", "hsdp")
