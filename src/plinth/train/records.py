"""What the loop records between metric records: the window of steps since the last record,
the update/weight ratio, and the one-line validation summary (plinth.train.loop uses them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from plinth.distributed.env import DistEnv, all_reduce_sum


@dataclass
class MetricWindow:
    """Accumulates steps between two metric records."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    time: float = 0.0
    data: float = 0.0
    clipped: int = 0
    step_times: list[float] = field(default_factory=list)
    task: dict[str, float] = field(default_factory=dict)  # sums of the task's own metrics

    def add_task(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.task[k] = self.task.get(k, 0.0) + v

    def task_means(self) -> dict[str, float]:
        """The task's metrics (LossOutput.metrics) averaged over the window's steps."""
        return {f"train/{k}": v / self.steps for k, v in self.task.items()}

    def percentile(self, q: float) -> float:
        ordered = sorted(self.step_times)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (the tensor itself when not sharded)."""
    return t.to_local() if hasattr(t, "to_local") else t


def update_ratio(
    before: list[torch.Tensor],
    params: list[torch.Tensor],
    env: DistEnv | None = None,
    device: torch.device | None = None,
) -> float:
    """||update|| / ||weights|| over all trainable weights: ~1e-3 is healthy for Adam; much
    larger means the learning rate is too high, much smaller that layers barely move.
    `before` holds local tensors; sharded sums are reduced over ranks (replicas count every
    element equally often, which leaves the ratio unchanged)."""
    delta = sum(
        (local_shard(p.detach()).float() - b.float()).square().sum()
        for p, b in zip(params, before, strict=True)
    )
    weight = sum(b.float().square().sum() for b in before)
    sums = [float(delta), float(weight)]
    if env is not None and any(hasattr(p, "to_local") for p in params):
        sums = all_reduce_sum(sums, env, device)
    return math.sqrt(sums[0]) / max(math.sqrt(sums[1]), 1e-12)


def val_summary(val: dict) -> str:
    """One line of validation results: the loss, and bits/byte, accuracy or F1 when known."""
    parts = [f"val loss {val['val/loss']:.3f}"]
    for key, unit in (("val/bpb", " bits/byte"), ("val/accuracy", " accuracy"), ("val/f1", " F1")):
        if key in val:
            parts.append(f"{val[key]:.3f}{unit}")
    return ", ".join(parts)
