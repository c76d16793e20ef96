"""Checkpoints: everything needed to continue a run bit-for-bit, written so a crash never leaves
half of one.

    checkpoints/step_0000400/
        model.safetensors   weights (safe to load from untrusted sources); one process or ddp,
                            and the last checkpoint of a sharded run (consolidated on rank 0)
        sharded/            fsdp/hsdp: model + optimizer as torch.distributed.checkpoint (DCP)
                            shards, one file per rank plus .metadata
        train_state.pt      optimizer (unsharded runs, keyed by parameter name), scheduler,
                            data-loader position, counters, world size (plain tensors and
                            numbers; loaded with weights_only=True)
        ranks/rank_00000.pt per-rank RNG states (dropout, masking)
        meta.json           step, tokens, metrics, and the size + SHA-256 of each file above

A checkpoint is written to `step_XXXXXXX.tmp/` (every rank writes its own files into it) and
renamed into place by rank 0 after a barrier (the names: plinth.track.checkpoints). On load,
files are checked against meta.json; a truncated, corrupted or missing file (a lost shard)
skips the checkpoint in favour of the previous good one, and the caller is told.

Any checkpoint resumes on any world size and strategy: DCP reshards on load, and the optimizer
state is keyed by parameter name (torch.distributed.checkpoint.state_dict), so a 2-rank fsdp
run continues on one process and a one-process run continues under fsdp. The data position is
global; per-rank RNG states are restored only when the world size is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from plinth.distributed.env import DistEnv, barrier
from plinth.errors import PlinthError
from plinth.track.checkpoints import list_checkpoints, step_dir, tmp_dir
from plinth.track.files import save_safetensors

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
SHARDED_DIR = "sharded"
RANKS_DIR = "ranks"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # tied weights appear twice in state_dict; safetensors refuses shared storage
    return _dedupe(model.state_dict())


def is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP has turned the parameters into DTensor shards."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (on rank 0; {} elsewhere). Collective under FSDP: call on all ranks."""
    if not is_sharded(model):
        return model_state(model) if env.is_main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return _dedupe(full) if env.is_main else {}


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(
    checkpoints: Path,
    step: int,
    model: torch.nn.Module,
    train_state: dict,
    meta: dict,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    rank_state: dict | None = None,
    env: DistEnv | None = None,
    consolidate: bool = False,
) -> Path:
    """Write one checkpoint atomically; returns its directory. Under torchrun every rank must
    call it (sharded weights are written by all ranks); `consolidate` adds a single-file
    model.safetensors to a sharded checkpoint."""
    env = env or DistEnv()
    final = step_dir(checkpoints, step)
    tmp = tmp_dir(final)
    sharded = is_sharded(model)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer) if optimizer else (model.state_dict(), {})
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / SHARDED_DIR))
    if not sharded or consolidate:
        weights = full_model_state(model, env)
        if env.is_main:
            save_safetensors(weights, str(tmp / MODEL_FILE))
    if optimizer is not None and not sharded:  # every rank: the call may synchronise
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        train_state = {**train_state, "optimizer": get_optimizer_state_dict(model, optimizer)}
    if rank_state is not None:
        (tmp / RANKS_DIR).mkdir(exist_ok=True)
        torch.save(rank_state, tmp / RANKS_DIR / f"rank_{env.rank:05d}.pt")
    barrier(env)
    if env.is_main:
        torch.save({**train_state, "world_size": env.world_size}, tmp / STATE_FILE)
        files = {
            str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        (tmp / META_FILE).write_text(
            json.dumps({**meta, "step": step, "files": files}, indent=2)
        )
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier(env)
    return final


def verify(path: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong with it."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "meta.json is not valid JSON"
    for name, info in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} is truncated ({f.stat().st_size} of {info['bytes']} bytes)"
        if _sha256(f) != info["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


@dataclass
class Loaded:
    path: Path
    train_state: dict
    meta: dict
    skipped: list[tuple[Path, str]]  # newer checkpoints that were unusable, and why

    @property
    def sharded(self) -> bool:
        return (self.path / SHARDED_DIR).is_dir()

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The single-file weights (unsharded checkpoints, and a sharded run's last one)."""
        if not (self.path / MODEL_FILE).is_file():
            raise PlinthError(
                f"{self.path} holds sharded weights only ({SHARDED_DIR}/); load them into a "
                "model with Loaded.load_into(model)."
            )
        return load_file(str(self.path / MODEL_FILE))

    def load_into(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Weights (and optimizer state) into `model`, sharded by FSDP or not, from either
        format: DCP reshards to this world size; single files are split by FSDP's loader."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        has_file = (self.path / MODEL_FILE).is_file()
        if self.sharded and (optimizer is not None or not has_file):
            import torch.distributed.checkpoint as dcp

            if optimizer is not None:
                msd, osd = get_state_dict(model, optimizer)
            else:
                msd, osd = get_model_state_dict(model), {}
            state = {"model": msd, "optim": osd} if osd else {"model": msd}
            try:
                with warnings.catch_warnings():  # one process reading every shard is intended
                    warnings.filterwarnings("ignore", "torch.distributed is disabled")
                    dcp.load(
                        state,
                        checkpoint_id=str(self.path / SHARDED_DIR),
                        no_dist=not torch.distributed.is_initialized(),
                    )
            except Exception as e:  # DCP raises CheckpointException/RuntimeError/KeyError
                raise PlinthError(
                    f"could not load the sharded checkpoint {self.path / SHARDED_DIR}: "
                    f"{str(e).splitlines()[0][:300]}. Was it written by a different model "
                    "config? Resume from another checkpoint or start a new run."
                ) from None
            if optimizer is not None:
                set_state_dict(
                    model, optimizer, model_state_dict=state["model"], optim_state_dict=osd
                )
            else:
                set_model_state_dict(model, state["model"])
            return
        weights = self.weights
        if is_sharded(model):
            full = StateDictOptions(full_state_dict=True, strict=False)
            _check_keys(model, weights)
            set_model_state_dict(model, weights, options=full)
        else:
            load_weights(model, weights)
        if optimizer is not None:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(
                model,
                optimizer,
                self.train_state["optimizer"],
                options=StateDictOptions(full_state_dict=is_sharded(model)),
            )

    def rank_state(self, env: DistEnv) -> dict | None:
        """This rank's RNG states, when the checkpoint was written by the same world size."""
        if self.train_state.get("world_size", 1) != env.world_size:
            return None
        f = self.path / RANKS_DIR / f"rank_{env.rank:05d}.pt"
        return torch.load(f, weights_only=True) if f.is_file() else None


def load_latest(checkpoints: Path) -> Loaded:
    """The newest intact checkpoint; broken newer ones are reported in `.skipped`."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(checkpoints)):
        problem = verify(path)
        if problem is None:
            return load_checkpoint(path, skipped, check=False)
        skipped.append((path, problem))
    found = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "none were written"
    raise PlinthError(
        f"no usable checkpoint under {checkpoints} ({found}). Start a new run instead of "
        "resuming, or point --resume at a run that saved a checkpoint."
    )


def load_checkpoint(path: Path, skipped: list | None = None, check: bool = True) -> Loaded:
    """One checkpoint, verified against its meta.json unless the caller just did."""
    problem = verify(path) if check else None
    if problem is not None:
        raise PlinthError(
            f"checkpoint {path} is unusable: {problem}. Use another checkpoint (the run's "
            "checkpoints/ folder lists them) or resume the run to fall back automatically."
        )
    train_state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    meta = json.loads((path / META_FILE).read_text())
    return Loaded(path, train_state, meta, skipped or [])


def _check_keys(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    names = set(model.state_dict())
    unexpected = sorted(set(weights) - names)
    if unexpected:
        raise PlinthError(
            f"checkpoint weights do not match the model: unexpected {unexpected[:5]}. Was it "
            "written by a different model config?"
        )


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load safetensors weights, restoring tied parameters that were stored once."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    really_missing = [
        k for k in missing if not any(state[k].data_ptr() == state[o].data_ptr() for o in weights)
    ]
    if really_missing or unexpected:
        raise PlinthError(
            f"checkpoint weights do not match the model: missing {really_missing[:5]}, "
            f"unexpected {unexpected[:5]}. Was it written by a different model config?"
        )


def prune(checkpoints: Path, keep_last: int, best: Path | None) -> None:
    """Delete old checkpoints, keeping the newest `keep_last` and the best one."""
    ckpts = list_checkpoints(checkpoints)
    keep = set(ckpts[-keep_last:])
    if best is not None:
        keep.add(best)
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
