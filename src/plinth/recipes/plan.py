"""`plinth plan`: will this run fit, and how long will it take — before spending a GPU hour.

    plinth plan configs/quickstart.yaml
    plinth plan configs/ref-cpu-decoder.yaml preset=large --devices 8 --gpu h100 --strategy fsdp

Memory per device (formulas in plinth.train.memory) is broken down into weights, gradients
and optimizer state (fp32 master copies; FSDP shards all three across devices), activations
(the tensors plinth's blocks keep for backward, calibrated against measured training steps;
with activation checkpointing only each block's input is kept, plus one block's full
activations while it is recomputed) and the logits (the loss head's working memory: chunks of
them for the decoder's fused loss). The model is built on PyTorch's `meta`
device, so parameter and FLOP counts come from the real model classes without allocating
memory. Throughput assumes a model FLOP utilisation (MFU) of the hardware's peak: a datasheet
number for GPUs, the measured fp32 matmul peak on a CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from plinth.config.schema import Config
from plinth.errors import UsageError
from plinth.track.hardware import GPUS
from plinth.train.memory import memory_per_device

GIB = 2**30
GPU_MFU = 0.40  # what well-tuned dense LLM training reaches on current GPUs
CPU_MFU = 0.70  # measured for ref-cpu-decoder on this project's CPUs (bench/bench_train.py)
TOKENS_PER_PARAM = 20  # compute-optimal training tokens per parameter (Hoffmann et al. 2022)


def parse_bytes(text: str) -> float:
    """'80GB' -> 80e9, '24GiB' -> 24 * 2**30, '512M' -> 512e6."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise UsageError(f"cannot read the memory size {text!r}; write e.g. 80GB or 24GiB")
    scale = {"": 1, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2)]
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** scale


@dataclass
class Plan:
    params: int
    flops_per_token: float
    devices: int
    strategy: str
    memory: dict[str, float]  # bytes per device
    device_memory: float
    largest_micro_batch: int
    tokens_per_s: float
    train_tokens: int
    wall_s: float
    optimal_tokens: int
    micro_batch: int = 1  # per device, after fitting the global batch to the devices
    notes: list[str] = field(default_factory=list)  # what pretrain would adjust, and how
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= 0.9 * self.device_memory


def make_plan(
    cfg: Config,
    devices: int = 1,
    gpu: str | None = None,
    device_memory: float | None = None,
    strategy: str | None = None,
    cpu_peak: float | None = None,
) -> Plan:
    import torch

    from plinth.models import build_model

    with torch.device("meta"):  # real classes, no memory
        model = build_model(cfg.model)
    seq = cfg.model.max_seq_len
    flops = model.flops_per_token(seq)
    strategy = strategy or (
        cfg.distributed.strategy
        if cfg.distributed.strategy not in ("auto", "none")
        else ("ddp" if devices > 1 else "none")
    )
    if gpu is not None:
        key = gpu.lower().replace(" ", "").replace("nvidia", "")
        if key not in GPUS:
            raise UsageError(
                f"unknown --gpu {gpu!r}; known: {', '.join(GPUS)} (or give "
                "--device-memory and treat it as a CPU)"
            )
        _, peak, mem = GPUS[key]
        mfu = GPU_MFU
    else:
        import psutil

        from plinth.track.hardware import measure_matmul_peak

        peak = cpu_peak if cpu_peak is not None else measure_matmul_peak("cpu")
        mem = float(psutil.virtual_memory().total)
        mfu = CPU_MFU
    mem = device_memory or mem
    # the split pretrain would use: a micro_batch that does not divide the global batch over
    # the devices is lowered the same way (OptimConfig.fit_world), or refused the same way
    optim = cfg.optim.model_copy()
    try:
        note = optim.fit_world(seq, devices)
    except ValueError as e:
        raise UsageError(f"{e} (as pretrain would refuse it on {devices} devices)") from None
    micro = optim.micro_batch
    memory = memory_per_device(cfg, micro, devices, strategy)
    largest = 0
    for b in (2**i for i in range(0, 15)):
        if sum(memory_per_device(cfg, b, devices, strategy).values()) <= 0.9 * mem:
            largest = b
    tokens_per_s = devices * peak * mfu / flops
    o = cfg.optim
    seqs = o.sequences_per_step(seq)
    tokens_per_step = seqs * seq
    p = cfg.pretrain
    budget = [b for b in (p.max_tokens, p.max_steps and p.max_steps * tokens_per_step) if b]
    train_tokens = int(min(budget)) if budget else 0
    plan = Plan(
        params=model.num_params(),
        flops_per_token=flops,
        devices=devices,
        strategy=strategy,
        memory=memory,
        device_memory=mem,
        largest_micro_batch=largest,
        tokens_per_s=tokens_per_s,
        train_tokens=train_tokens,
        wall_s=train_tokens / tokens_per_s if train_tokens else 0.0,
        optimal_tokens=TOKENS_PER_PARAM * model.num_params(),
        micro_batch=micro,
        notes=[note] if note else [],
    )
    plan.warnings = warnings(cfg, plan)
    return plan


def warnings(cfg: Config, plan: Plan) -> list[str]:
    out = []
    if not plan.fits:
        fix = (
            "shard with --strategy fsdp across more devices, "
            if plan.strategy != "fsdp"
            else "add devices, "
        )
        out.append(
            f"will not fit: {plan.total / GIB:.1f} GiB per device needed, "
            f"{plan.device_memory / GIB:.1f} GiB available; {fix}turn on "
            "hardware.activation_checkpointing, or lower optim.micro_batch"
            + (
                f" (largest that fits: {plan.largest_micro_batch})"
                if plan.largest_micro_batch
                else ""
            )
        )
    lr, n = cfg.optim.lr, plan.params
    typical = 3e-4 if n > 1e9 else 6e-4 if n > 1e8 else 1e-3
    if not typical / 10 <= lr <= typical * 5:
        out.append(
            f"optim.lr={lr:g} is unusual for {n / 1e6:,.0f}M parameters "
            f"(typical peak ~{typical:g}); check it is intended"
        )
    if plan.train_tokens and plan.train_tokens < plan.optimal_tokens / 10:
        out.append(
            f"{plan.train_tokens:,} training tokens is far below the compute-optimal "
            f"~{plan.optimal_tokens:,} for this size; expect an undertrained model"
        )
    return out


def plan_cmd(
    config: str,
    overrides: list[str] = (),
    *,
    devices: int = 1,
    gpu: str | None = None,
    device_memory: str | None = None,
    strategy: str | None = None,
) -> int:
    """Estimate memory per device, the largest micro-batch, throughput and wall time of a run.

    Exits 1 when the run would not fit, so `plinth plan ... && torchrun ...` is safe.

    Args:
        config: YAML config file or shipped recipe name
        overrides: key=value changes, e.g. preset=large model.max_seq_len=4096
        devices: number of devices (GPUs, or CPU processes) the run will use
        gpu: GPU model for peak FLOP/s and memory, e.g. h100, a100, l4 (default: this CPU)
        device_memory: memory per device, e.g. 80GB or 24GiB (overrides the GPU's)
        strategy: none, ddp, fsdp or hsdp (default: distributed.strategy; ddp for several
            devices)
    """
    from rich.console import Console
    from rich.table import Table

    from plinth.config.load import load_config, split_args

    files, overs = split_args([config], overrides)
    cfg = load_config(files, overs).config
    if strategy not in (None, "none", "ddp", "fsdp", "hsdp"):
        raise UsageError(f"--strategy {strategy!r}: choose none, ddp, fsdp or hsdp")
    plan = make_plan(
        cfg,
        devices=devices,
        gpu=gpu,
        strategy=strategy,
        device_memory=parse_bytes(device_memory) if device_memory else None,
    )
    con = Console(highlight=False)
    where = f"{devices} x {gpu or 'CPU'}" + (f", {plan.strategy}" if devices > 1 else "")
    con.print(
        f"[bold]{cfg.model.arch}[/] {plan.params / 1e6:,.1f}M parameters, "
        f"{plan.flops_per_token / 1e9:.2f} GFLOP per training token, on {where}"
    )
    table = Table(box=None, header_style="bold")
    table.add_column("memory per device")
    table.add_column("GiB", justify="right")
    for k, v in plan.memory.items():
        table.add_row(k, f"{v / GIB:.2f}")
    table.add_row(
        "[bold]total[/]", f"[bold]{plan.total / GIB:.2f}[/] of {plan.device_memory / GIB:.1f}"
    )
    con.print(table)
    for n in plan.notes:
        con.print(f"note: {n}")
    con.print(
        f"largest micro-batch that fits: {plan.largest_micro_batch} "
        f"(this run: {plan.micro_batch} per device)"
    )
    con.print(
        f"throughput: ~{plan.tokens_per_s:,.0f} tokens/s "
        f"(MFU {GPU_MFU if gpu else CPU_MFU:.0%} assumed)"
    )
    if plan.train_tokens:
        con.print(
            f"training tokens: {plan.train_tokens:,} -> about {_duration(plan.wall_s)} "
            f"({plan.devices * plan.wall_s / 3600:,.1f} device-hours)"
        )
    con.print(f"compute-optimal tokens (~{TOKENS_PER_PARAM}/parameter): {plan.optimal_tokens:,}")
    for w in plan.warnings:
        con.print(f"[yellow]warning:[/] {w}")
    return 0 if plan.fits else 1


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
