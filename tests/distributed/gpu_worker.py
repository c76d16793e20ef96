"""FSDP2 and DDP on NCCL with the GPUs of one machine; run under torchrun.

    torchrun --standalone --nproc_per_node=1 tests/distributed/gpu_worker.py OUT_DIR

Trains the same model unwrapped, under DDP and under FSDP2 (bf16 parameter policy), compares
the losses, and round-trips a DCP checkpoint into a plain CPU model. Writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from plinth.config.load import load_config
from plinth.distributed.device import autocast_context
from plinth.distributed.env import DistEnv, init_process_group
from plinth.distributed.parallelize import parallelize
from plinth.models import build_model
from plinth.train import state as ckpt
from plinth.train.objectives import SpecialTokens, compute_loss
from plinth.train.optim import build_optimizer

out = Path(sys.argv[1])
cfg = load_config(
    [],
    [
        "model.n_layers=4",
        "model.d_model=256",
        "model.n_heads=4",
        "model.vocab_size=1024",
        "model.max_seq_len=128",
        "model.dropout=0",
        "hardware.precision=bf16",
        "hardware.activation_checkpointing=true",
        "optim.lr=1e-3",
    ],
).config
env = DistEnv.from_environ()
device = torch.device("cuda", env.local_rank)
torch.cuda.set_device(device)
if env.distributed:
    init_process_group(cfg, env, device)
else:  # plinth needs no process group for one rank; this test wants NCCL even so
    dist.init_process_group("nccl")
assert dist.get_backend() == "nccl"
special = SpecialTokens(eos_id=0, pad_id=1, mask_id=2, bos_id=3, sentinel_ids=[])


def train(strategy: str, steps: int = 10):
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    net = parallelize(model, cfg, env, device, strategy)
    opt = build_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(1 + env.rank)
    batch = torch.randint(4, 1024, (8, 129), generator=gen).to(device)  # memorised: loss falls
    losses = []
    for _ in range(steps):
        with autocast_context(cfg, device):
            loss = compute_loss("clm", net, batch, special).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, opt, losses


_, _, plain = train("none")
_, _, ddp = train("ddp")
model, opt, fsdp = train("fsdp")
param_dtype = {str(p.dtype) for p in model.parameters()}
ckpt.save_checkpoint(out / "ckpts", 10, model, {}, {}, optimizer=opt, env=env, consolidate=True)
full = ckpt.full_model_state(model, env)
result = {"plain": plain, "ddp": ddp, "fsdp": fsdp, "master_dtype": sorted(param_dtype)}
if env.is_main:
    cpu_model = build_model(cfg.model)
    loaded = ckpt.load_checkpoint(out / "ckpts" / "step_0000010")
    (out / "ckpts" / "step_0000010" / "model.safetensors").unlink()  # force the DCP path
    loaded.load_into(cpu_model)
    state = cpu_model.state_dict()
    result["dcp_equal"] = all(torch.equal(state[k], v) for k, v in full.items())
    result["gpu"] = torch.cuda.get_device_name()
    (out / "result.json").write_text(json.dumps(result))
dist.destroy_process_group()
