"""Optimizers and learning-rate schedules built from `OptimConfig`.

    python -c "from plinth.config.schema import ModelConfig, OptimConfig; \
from plinth.models import build_model; from plinth.train.optim import *; \
o = build_optimizer(build_model(ModelConfig(n_layers=1)), OptimConfig(name='muon')); \
s = build_scheduler(o, OptimConfig(), 1000); print([len(g['params']) for g in o.param_groups])"

Parameter groups: matrices decay; norms, biases and embeddings do not (decaying them only pulls
gains toward zero and rare tokens' embeddings toward the origin). AdamW uses the fused kernel
(CPU and CUDA) where the parameters allow it, else the multi-tensor (foreach) one.

Muon (Jordan et al. 2024) updates 2-D hidden weights with momentum orthogonalised by a
Newton-Schulz iteration; embeddings, the output head, norms and biases keep AdamW. Both live in
one `Muon` optimizer object (one state_dict for checkpoints). Muon's update is rescaled to the
RMS of a typical AdamW update (Moonshot's "Muon is scalable"), so one `optim.lr` and one weight
decay serve both halves.

Schedules are multipliers of the peak lr in a `LambdaLR`: linear warmup over warmup_steps (step
s gets (s+1)/warmup_steps), then constant, linear or cosine decay to min_lr_ratio at
total_steps, or warmup-stable-decay (peak until the last decay_frac of the run, then linear).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plinth.config.schema import OptimConfig
from plinth.models import unwrap


def param_groups(model: nn.Module, muon: bool = False) -> list[dict]:
    """Trainable parameters split into groups: `decay` (matrices) and `no_decay` (norms, biases,
    embeddings); with muon=True the hidden matrices form a third group flagged use_muon."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(unwrap(model), "lm_head", None)
    head_ids = {id(head.weight)} if isinstance(head, nn.Linear) else set()
    hidden, decay, no_decay = [], [], []
    for p in _unique_trainable(model):
        if p.ndim < 2 or id(p) in embeddings:
            no_decay.append(p)
        elif muon and id(p) not in head_ids:
            hidden.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "name": "decay"},
        {"params": no_decay, "name": "no_decay", "weight_decay": 0.0},
    ]
    if muon:
        groups.append({"params": hidden, "name": "muon", "use_muon": True})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over the model's trainable parameters (see the module doc)."""
    groups = param_groups(model, muon=cfg.name == "muon")
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    wd = cfg.weight_decay
    if cfg.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd, **_fast_kernel(params)
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    if cfg.name == "muon":
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, betas=cfg.betas, eps=cfg.eps,
                    weight_decay=wd)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based) as a fraction of cfg.lr."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_frac * total_steps))
        start = total_steps - decay_steps
        if step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - start) / decay_steps)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimizer step through `lr_multiplier`. When resuming, build
    it before `optimizer.load_state_dict` (constructing a LambdaLR resets the groups' lr)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, total_steps)
    )


# ----------------------------------------------------------------------------------------- Muon


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise g (rows x cols): U V^T of its SVD, by a quintic Newton-Schulz
    iteration whose coefficients push every singular value into ~[0.7, 1.2] in 5 steps."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)  # bf16 is safe here on GPUs
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T  # iterate on the wide side: (r, c) with r <= c, so x @ x.T is the small Gram
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups flagged `use_muon`, AdamW for the others, in one optimizer.

    Muon step for a matrix W (rows x cols) with gradient G:
        m = momentum * m + (1 - momentum) * G;  u = lerp(G, m, momentum)  (Nesterov)
        W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(rows, cols)) * NewtonSchulz(u)
    The 0.2 * sqrt(max dim) factor matches the RMS of an AdamW update, so AdamW's lr transfers.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas,
            eps=eps, weight_decay=weight_decay, use_muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups may only hold 2-D matrices")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)
            u = p.grad.lerp(buf, mom) if group["nesterov"] else buf
            u = newton_schulz(u, group["ns_steps"])
            p.mul_(1 - lr * wd)
            p.add_(u, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2**t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


# -------------------------------------------------------------------------------------- helpers


def _unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():  # parameters() already skips tied duplicates
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _fast_kernel(params: list[torch.Tensor]) -> dict:
    """fused=True where every parameter is a float tensor on CPU/CUDA, else torch's default
    (foreach on accelerators)."""
    ok = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}
