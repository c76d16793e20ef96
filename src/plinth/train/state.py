"""Checkpoints: everything needed to continue a run bit-for-bit, written so a crash never leaves
half of one.

    checkpoints/step_0000400/
        model.safetensors   weights (safe to load from untrusted sources)
        train_state.pt      optimizer, scheduler, data-loader position, RNG states, counters
                            (plain tensors and numbers; loaded with weights_only=True)
        meta.json           step, tokens, metrics, and the size + SHA-256 of each file above

A checkpoint is written to `step_XXXXXXX.tmp/` and renamed into place. On load, files are
checked against meta.json; a truncated or corrupted checkpoint is skipped in favour of the
previous good one, and the caller is told.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from plinth.errors import PlinthError

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step_{step:07d}"


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
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(
    checkpoints: Path, step: int, model: torch.nn.Module, train_state: dict, meta: dict
) -> Path:
    """Write one checkpoint atomically; returns its directory."""
    final = step_dir(checkpoints, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model_state(model), str(tmp / MODEL_FILE))
    torch.save(train_state, tmp / STATE_FILE)
    files = {
        n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
        for n in (MODEL_FILE, STATE_FILE)
    }
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step, "files": files}, indent=2))
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (.tmp leftovers of a crash are ignored)."""
    if not checkpoints.is_dir():
        return []
    return sorted(
        p for p in checkpoints.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
    )


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
    weights: dict[str, torch.Tensor]
    train_state: dict
    meta: dict
    skipped: list[tuple[Path, str]]  # newer checkpoints that were unusable, and why


def load_latest(checkpoints: Path) -> Loaded:
    """The newest intact checkpoint; broken newer ones are reported in `.skipped`."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(checkpoints)):
        problem = verify(path)
        if problem is None:
            return load_checkpoint(path, skipped)
        skipped.append((path, problem))
    found = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "none were written"
    raise PlinthError(
        f"no usable checkpoint under {checkpoints} ({found}). Start a new run instead of "
        "resuming, or point --resume at a run that saved a checkpoint."
    )


def load_checkpoint(path: Path, skipped: list | None = None) -> Loaded:
    weights = load_file(str(path / MODEL_FILE))
    train_state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    meta = json.loads((path / META_FILE).read_text())
    return Loaded(path, weights, train_state, meta, skipped or [])


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
