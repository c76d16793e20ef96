"""Periodic work that reaches the training loop from above: text samples (plinth.infer) and task
scores (plinth.eval). The recipe builds them and passes them in, so plinth.train imports
neither; the loop only decides when to call them and records what they return.

    train(cfg, task, run, hooks=Hooks(sample=my_sampler, score=my_scorer))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

Sampler = Callable[[nn.Module, int, torch.device], list[tuple[str, str]]]
"""sample(model, step, device) -> [(prompt, text)]: every `tracking.sample_every` steps and at the
end, on rank 0 (on every rank when weights are sharded: each forward needs them all)."""


class Scorer(Protocol):
    """Task scores on rank 0 (`tracking.eval_tasks`), recorded like validation metrics."""

    def due(self, step: int, is_last: bool) -> bool: ...

    def __call__(self, model: nn.Module) -> dict[str, float]: ...


@dataclass(frozen=True)
class Hooks:
    sample: Sampler | None = None
    score: Scorer | None = None
