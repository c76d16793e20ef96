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
files are checked against meta.json and then opened (train_state.pt and ranks/ as plain
tensors, model.safetensors' header, DCP's .metadata with a restricted unpickler); a truncated,
corrupted, missing or undeserializable file (a lost shard, a zip that is not a torch file, a
meta.json of the wrong shape) skips the checkpoint in favour of the previous good one, and the
caller is told; a checkpoint named explicitly is refused (UsageError naming the file).

A parameter-efficient fine-tune (LoRA, QLoRA, ...) stores only its trainable weights in
model.safetensors, with `"weights": "trainable"` and the base's dir, name and fingerprint under
`"base"` in meta.json; loading puts them onto the rebuilt base, whose fingerprint must match.

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
from plinth.errors import UsageError
from plinth.track.checkpoints import list_checkpoints, step_dir, tmp_dir
from plinth.track.files import save_safetensors

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
SHARDED_DIR = "sharded"
RANKS_DIR = "ranks"
RESUME_KEYS = ("scheduler", "loader", "guard", "counters", "optimizer")  # what resume reads
WEIGHTS_KEY, TRAINABLE, BASE_KEY = "weights", "trainable", "base"  # meta.json of a partial one


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


def trainable_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the trainable parameters (every name of a tied one)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


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
    base: dict | None = None,
) -> Path:
    """Write one checkpoint atomically; returns its directory. Under torchrun every rank must
    call it (sharded weights are written by all ranks); `consolidate` adds a single-file
    model.safetensors to a sharded checkpoint. `base` (a parameter-efficient fine-tune: the
    base's dir, name and fingerprint) stores only the trainable weights in model.safetensors
    and records the base in meta.json, which loading checks (see `load_into`)."""
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
        if base is not None and not sharded:
            weights = {k: v for k, v in weights.items() if k in trainable_names(model)}
            meta = {**meta, WEIGHTS_KEY: TRAINABLE, BASE_KEY: base}
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
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return "meta.json is not valid JSON"
    except OSError as e:
        return f"meta.json cannot be read ({e.strerror})"
    problem = _meta_shape(meta)
    if problem is not None:
        return problem
    for name, info in meta["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} is truncated ({f.stat().st_size} of {info['bytes']} bytes)"
        if _sha256(f) != info["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def _meta_shape(meta: Any) -> str | None:
    """What is wrong with the layout of a parsed meta.json (None: a checkpoint manifest)."""
    wrong = "meta.json is valid JSON but not a checkpoint manifest"
    if not isinstance(meta, dict):
        return f"{wrong} (a {type(meta).__name__}, not an object)"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"{wrong} (no `files` table of sizes and checksums)"
    for name, info in files.items():
        if (
            not isinstance(info, dict)
            or type(info.get("bytes")) is not int
            or not isinstance(info.get("sha256"), str)
            or Path(name).is_absolute()
            or ".." in Path(name).parts
        ):
            return f"{wrong} (its entry for {name[:80]!r} is not {{bytes, sha256}})"
    if not isinstance(meta.get("step", 0), int):
        return f"{wrong} (`step` is not an integer)"
    if meta.get(WEIGHTS_KEY) == TRAINABLE and not isinstance(meta.get(BASE_KEY), dict):
        return f"{wrong} (trainable weights only, but no `base` record)"
    return None


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_torch(f: Path) -> dict:
    """A plain-tensor torch file (weights_only); ValueError saying why it cannot be used."""
    try:
        data = torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # zip without data.pkl, random bytes, a disallowed global: all unusable
        raise ValueError(f"{f.name} does not deserialize ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f.name} holds a {type(data).__name__}, not a state dictionary")
    return data


def read(path: Path, required: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(train_state, meta) of a checkpoint that passed `verify`, with every file it holds
    opened: ValueError saying which file does not deserialize (a zip that is not a torch file,
    a safetensors file with a bad header, random bytes whose checksum was recorded) or lacks
    one of the `required` train_state keys."""
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    train_state = _read_torch(path / STATE_FILE)
    if (path / SHARDED_DIR).is_dir():  # the optimizer state is in the DCP shards
        required = tuple(k for k in required if k != "optimizer")
    missing = [k for k in required if k not in train_state]
    if missing:
        raise ValueError(f"{STATE_FILE} lacks {', '.join(missing)}: not a training state")
    if (path / MODEL_FILE).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path / MODEL_FILE), "pt") as f:
                list(f.keys())
        except Exception as e:  # SafetensorError: bad header, offsets past the end, ...
            raise ValueError(f"{MODEL_FILE} does not deserialize ({_first_line(e)})") from None
    ranks = path / RANKS_DIR
    for f in sorted(ranks.glob("*.pt")) if ranks.is_dir() else []:
        _read_torch(f)
    if (path / SHARDED_DIR).is_dir():
        _check_dcp_metadata(path / SHARDED_DIR / ".metadata")
    return train_state, meta


def _check_dcp_metadata(f: Path) -> None:
    """DCP reads sharded/.metadata with plain pickle.load, which would run code from a hostile
    file: refuse any pickle that names something besides DCP's metadata classes."""
    import pickle

    allowed = {("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    dcp = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if "." not in name:
                if (module, name) in allowed:
                    return super().find_class(module, name)
                if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                    return getattr(torch, name)
                found = super().find_class(module, name) if module in dcp else None
                if isinstance(found, type):  # DCP's metadata classes, nothing callable else
                    return found
            raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")

    if not f.is_file():
        raise ValueError(f"{SHARDED_DIR}/.metadata is missing")
    try:
        with open(f, "rb") as fh:
            Restricted(fh).load()
    except Exception as e:
        raise ValueError(
            f"{SHARDED_DIR}/.metadata does not deserialize safely ({_first_line(e)})"
        ) from None


def problem(path: Path, required: tuple[str, ...] = ()) -> str | None:
    """None when the checkpoint is intact and loads, else what is wrong with it."""
    found = verify(path)
    if found is None:
        try:
            read(path, required)
        except ValueError as e:
            found = str(e)
    return found


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
            raise UsageError(
                f"{self.path} holds sharded weights only ({SHARDED_DIR}/); load them into a "
                "model with Loaded.load_into(model)."
            )
        try:
            return load_file(str(self.path / MODEL_FILE))
        except Exception as e:  # read() opened it; a file changed since is still refused
            raise UsageError(
                f"{self.path / MODEL_FILE} does not deserialize ({_first_line(e)}). Use another "
                "checkpoint of the run, or the run directory to fall back automatically."
            ) from None

    @property
    def base(self) -> dict | None:
        """The base record of a checkpoint that holds only trainable weights (else None)."""
        return self.meta.get(BASE_KEY) if self.meta.get(WEIGHTS_KEY) == TRAINABLE else None

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
                raise UsageError(
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
        if self.base is not None:
            _check_base(self, model, weights)
        if is_sharded(model):
            full = StateDictOptions(full_state_dict=True, strict=False)
            _check_keys(model, weights)
            set_model_state_dict(model, weights, options=full)
        else:
            load_weights(model, weights, partial=self.base is not None)
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


def load_latest(checkpoints: Path, required: tuple[str, ...] = ()) -> Loaded:
    """The newest intact checkpoint whose files load; broken newer ones are reported in
    `.skipped`. `required`: train_state keys a usable one must hold."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(checkpoints)):
        found = verify(path)
        if found is None:
            try:
                train_state, meta = read(path, required)
                return Loaded(path, train_state, meta, skipped)
            except ValueError as e:
                found = str(e)
        skipped.append((path, found))
    found = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "none were written"
    raise UsageError(
        f"no usable checkpoint under {checkpoints} ({found[:600]}). Start a new run instead "
        "of resuming, or point at a run that saved a checkpoint."
    )


def load_checkpoint(
    path: Path, skipped: list | None = None, check: bool = True, required: tuple[str, ...] = ()
) -> Loaded:
    """One checkpoint, verified against its meta.json unless the caller just did; every file is
    opened either way (UsageError naming the one that does not deserialize)."""
    found = verify(path) if check else None
    if found is None:
        try:
            train_state, meta = read(path, required)
        except ValueError as e:
            found = str(e)
    if found is not None:
        raise UsageError(
            f"checkpoint {path} is unusable: {found}. Use another checkpoint (the run's "
            "checkpoints/ folder lists them) or give the run directory to fall back to the "
            "newest good one automatically."
        )
    return Loaded(path, train_state, meta, skipped or [])


def _check_base(loaded: Loaded, model: torch.nn.Module, weights: dict) -> None:
    """A checkpoint of trainable weights only goes onto the base it was trained from."""
    from plinth.models import unwrap

    base = loaded.base
    want, got = base.get("fingerprint"), getattr(unwrap(model), "peft_base_fingerprint", None)
    where = f"{base.get('name')!r} ({base.get('dir')}), fingerprint {want}"
    if got is None:
        raise UsageError(
            f"{loaded.path} holds only the trained weights of a {base.get('method', 'LoRA')} "
            f"fine-tune of {where}; it loads onto that base with the same method (a fine-tune "
            "run or checkpoint given to plinth), not as a plain model. To use it as a plain "
            "model, `plinth export` the run (merged) and use the export."
        )
    if got != want:
        raise UsageError(
            f"{loaded.path} holds only the trained weights of a fine-tune of {where}, but the "
            f"base it is being put on has fingerprint {got}: a different model. Point "
            "finetune.base in the run's config.yaml at the original base (restore it at "
            f"{base.get('dir')}), or train again on this one."
        )


def _check_keys(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    names = set(model.state_dict())
    unexpected = sorted(set(weights) - names)
    if unexpected:
        raise UsageError(
            f"checkpoint weights do not match the model: unexpected {unexpected[:5]}. Was it "
            "written by a different model config?"
        )


def load_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], partial: bool = False
) -> None:
    """Load safetensors weights, restoring tied parameters that were stored once. `partial`:
    only the trainable parameters are stored (the rest came from the base)."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise UsageError(
            f"checkpoint weights do not fit the model ({_first_line(e)[:300]}). Was it written "
            "by a different model config?"
        ) from None
    state = model.state_dict()
    if partial:
        missing = [k for k in missing if k in trainable_names(model)]
    really_missing = [
        k for k in missing if not any(state[k].data_ptr() == state[o].data_ptr() for o in weights)
    ]
    if really_missing or unexpected:
        raise UsageError(
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
