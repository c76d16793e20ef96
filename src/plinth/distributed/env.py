"""Who am I in a torchrun job, and the process group that connects the ranks.

    torchrun --nproc_per_node=4 -m plinth pretrain configs/quickstart.yaml

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous address;
plinth reads them and never launches processes itself. One process (no torchrun) is world
size 1 and needs no process group. Only rank 0 writes run files and prints.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from plinth.config.schema import Config
from plinth.errors import NotSupportedError, PlinthError, UsageError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> DistEnv:
        """torchrun's variables; a plain process is rank 0 of 1."""
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local_rank = int(environ.get("LOCAL_RANK", str(rank)))
            local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError as e:
            raise UsageError(
                f"bad torchrun environment ({e}): RANK, WORLD_SIZE, LOCAL_RANK and "
                "LOCAL_WORLD_SIZE must be integers. Launch with torchrun rather than setting them "
                "by hand."
            ) from None
        if not 0 <= rank < world:
            raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
        return cls(rank, world, local_rank, local_world)


def resolve_strategy(cfg: Config, env: DistEnv) -> str:
    """none | ddp | fsdp | hsdp for this job; a single process always trains unwrapped."""
    want = cfg.distributed.strategy
    if not env.distributed:
        return "none"
    return "ddp" if want in ("auto", "none") else want


def check_strategy(cfg: Config, env: DistEnv, device: torch.device) -> str:
    """The strategy, after refusing combinations that cannot work (with the fix)."""
    strategy = resolve_strategy(cfg, env)
    d = cfg.distributed
    if cfg.distributed.strategy == "none" and env.distributed:
        raise UsageError(
            f"distributed.strategy=none but torchrun started {env.world_size} processes: each "
            "would train its own copy of the model on the same data. Use distributed.strategy="
            "ddp (or fsdp), or launch a single process."
        )
    if d.backend == "nccl" and device.type != "cuda":
        raise NotSupportedError(
            "distributed.backend=nccl needs CUDA GPUs but this job runs on the CPU. Use "
            "distributed.backend=auto (gloo on CPU) or hardware.device=cuda on a GPU machine."
        )
    if strategy in ("fsdp", "hsdp"):
        if cfg.optim.name == "muon":
            raise NotSupportedError(
                f"optim.name=muon with distributed.strategy={strategy}: Muon orthogonalises "
                "whole weight matrices, but FSDP gives each rank only a shard. Use "
                "distributed.strategy=ddp with Muon, or optim.name=adamw with FSDP."
            )
        if cfg.hardware.precision == "fp16" and device.type == "cuda":
            raise NotSupportedError(
                f"hardware.precision=fp16 with distributed.strategy={strategy} is not supported "
                "(sharded fp16 loss scaling). Use hardware.precision=bf16, or strategy=ddp."
            )
    if strategy == "hsdp":
        size = d.shard_size or env.local_world_size
        if env.world_size % size:
            raise UsageError(
                f"distributed.shard_size={size} does not divide the world size "
                f"{env.world_size}; hsdp needs groups of equal size. Set "
                "distributed.shard_size to a divisor (usually the GPUs per node)."
            )
    return strategy


def hsdp_shape(cfg: Config, env: DistEnv) -> tuple[int, int]:
    """(replicas, shard size) of the 2-D mesh for hybrid sharding."""
    size = cfg.distributed.shard_size or env.local_world_size
    return env.world_size // size, size


def init_process_group(cfg: Config, env: DistEnv, device: torch.device) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPU) with the configured timeout."""
    import torch.distributed as dist

    if not env.distributed or dist.is_initialized():
        return
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s),
        )
    except Exception as e:  # rendezvous failures come in many types
        raise PlinthError(
            f"rank {env.rank} could not join the process group ({backend}): {e}. Check that "
            "every node uses the same --rdzv_endpoint / MASTER_ADDR:MASTER_PORT and can reach "
            "it, and that --nnodes and --nproc_per_node match on all nodes."
        ) from None


def device_for(cfg: Config, env: DistEnv, device: torch.device) -> torch.device:
    """One GPU per rank: cuda:LOCAL_RANK."""
    if device.type == "cuda" and env.distributed:
        if env.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} "
                "GPUs: --nproc_per_node must not exceed the GPUs per node."
            )
        return torch.device("cuda", env.local_rank)
    return device


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (one small collective); unchanged on one process."""
    if not env.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank (e.g. the run directory rank 0 chose)."""
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collective_failure(e: BaseException, env: DistEnv, step: int, timeout: int) -> PlinthError:
    """The error a rank raises when a collective at `step` failed: most likely another rank died."""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return PlinthError(
        f"rank {env.rank} of {env.world_size} lost contact with the other ranks at step "
        f"{step + 1} ({first}). Another rank most likely failed: its own output (torchrun "
        "prints each rank's error) says why. Collectives give up after distributed.timeout_s="
        f"{timeout} s rather than hang; resume the run with --resume once the cause is fixed."
    )


def is_collective_failure(e: BaseException) -> bool:
    """Whether an exception came from a collective that lost its peers (gloo/NCCL, timeouts)."""
    import torch.distributed as dist

    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection closed", "timed out", "connection reset")
    )
