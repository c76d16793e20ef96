"""Apply efficiency and parallelism to a single-device model from outside, in a fixed order:
activation checkpointing -> torch.compile -> (DDP | FSDP2 | HSDP).

Model files stay plain PyTorch and never import torch.distributed. Checkpointing wraps each
transformer block's forward in place, so parameter names (and checkpoints) do not change.

- none: one process; compile wraps the whole model.
- ddp: every rank holds the model; gradients are all-reduced in buckets during backward
  (the loop skips the all-reduce on all but the last micro-batch of an accumulation).
- fsdp (FSDP2 `fully_shard`): each transformer block is sharded over all ranks, then the root
  (embeddings, final norm, head): parameters, gradients and optimizer state are split
  ZeRO-3-style; a block's parameters are gathered just before it runs. Mixed precision is a
  policy: gathered parameters in `distributed.param_dtype`, gradient reduction in
  `distributed.reduce_dtype`, fp32 master weights and optimizer state.
- hsdp: the same on a 2-D mesh (replicas x shard_size): shard within a group (a node),
  replicate across groups.
With fsdp/hsdp, compile is applied per block (in place) so FSDP's hooks sit at block boundaries.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plinth.config.schema import Config
from plinth.distributed.env import DistEnv, hsdp_shape


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block in the model's `layers` ModuleLists (encoder and decoder stacks alike)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            blocks.extend(module)
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward; returns how many blocks were wrapped."""
    blocks = transformer_blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parallelize(
    model: nn.Module,
    cfg: Config,
    env: DistEnv | None = None,
    device: torch.device | None = None,
    strategy: str = "none",
) -> nn.Module:
    """The module to call for training steps. Save and load through the original `model`
    (under fsdp/hsdp `model` itself becomes the sharded root; its names do not change)."""
    env = env or DistEnv()
    if cfg.hardware.activation_checkpointing:
        apply_activation_checkpointing(model)
    if strategy in ("fsdp", "hsdp"):
        if cfg.hardware.compile:
            for block in transformer_blocks(model):
                block.compile()
        return shard_model(model, cfg, env, device or torch.device("cpu"), strategy)
    net = torch.compile(model) if cfg.hardware.compile else model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # our buffers (RoPE tables) are derived, not learned, and may grow on one rank only
        # (rank 0 samples longer sequences): syncing them each forward would mismatch.
        # torch >= 2.13 names the switch forward_sync_buffers; older releases broadcast_buffers.
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = next(k for k in ("forward_sync_buffers", "broadcast_buffers") if k in params)
        return DistributedDataParallel(
            net,
            device_ids=[device.index] if device is not None and device.type == "cuda" else None,
            bucket_cap_mb=cfg.distributed.bucket_mb,
            gradient_as_bucket_view=True,
            **{no_sync: False},
        )
    return net


def mixed_precision(cfg: Config):
    """FSDP2's policy: parameter dtype follows hardware.precision unless set explicitly."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    d = cfg.distributed
    param = d.param_dtype if d.param_dtype != "auto" else cfg.hardware.precision
    return MixedPrecisionPolicy(param_dtype=DTYPES[param], reduce_dtype=DTYPES[d.reduce_dtype])


def shard_model(
    model: nn.Module, cfg: Config, env: DistEnv, device: torch.device, strategy: str
) -> nn.Module:
    """fully_shard each transformer block, then the root, on a 1-D (fsdp) or 2-D (hsdp) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if strategy == "hsdp":
        mesh = init_device_mesh(
            device.type, hsdp_shape(cfg, env), mesh_dim_names=("replicate", "shard")
        )
    else:
        mesh = init_device_mesh(device.type, (env.world_size,), mesh_dim_names=("shard",))
    kwargs = {"mesh": mesh, "mp_policy": mixed_precision(cfg)}
    reshard = cfg.distributed.reshard_after_forward
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # the last block is gathered again right away for backward: keeping it saves a gather
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    return model


def grad_sync(net, strategy: str, sync: bool):
    """Skip needless gradient all-reduces on all but the last micro-batch of a step: DDP's
    no_sync, and HSDP's all-reduce across replicas (FSDP still reduce-scatters every
    micro-batch, otherwise each rank would hold unsharded gradients)."""
    if strategy == "ddp" and not sync:
        return net.no_sync()
    if strategy == "hsdp":
        net.set_requires_all_reduce(sync)
    return contextlib.nullcontext()
