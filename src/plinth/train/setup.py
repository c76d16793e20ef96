"""What every training recipe does around the one loop: refuse options it does not honour and
place the job (`start`), check a resumed run's config (`resolve_resume`), pick or reopen the run
directory (`open_run`), and print the closing summary (`print_train_summary`).

    placement = start(resolved, UNSUPPORTED, "pretrain")
    run = open_run(cfg, placement.env, None, "pretrain-decoder")  # after init_process_group
"""

from __future__ import annotations

from pathlib import Path

from plinth.config.checks import environment_warnings, reject_unsupported
from plinth.config.load import Resolved, get_value, leaf_fields, load_config
from plinth.distributed.device import Placement
from plinth.distributed.env import DistEnv, broadcast_object
from plinth.errors import UsageError
from plinth.track.run import RunDir, RunPaths, unique_run_path

# keys a resumed run may change; anything else would silently alter the run being continued
RESUMABLE_CHANGES = (
    "pretrain.max_steps",
    "pretrain.max_tokens",
    "pretrain.max_epochs",
    "tracking.",
    "hardware.num_workers",
    "inference.",
)


def start(resolved: Resolved, unsupported: dict, recipe: str) -> Placement:
    """What every training recipe does first: refuse options it does not honour, print
    environment warnings (rank 0), pick the device and the distributed strategy."""
    env = DistEnv.from_environ()
    reject_unsupported(resolved, unsupported, recipe)
    if env.is_main:
        for warning in environment_warnings(resolved):
            print(f"warning: {warning}")
    return Placement.resolve(resolved.config, env)


def say_notes(resolved: Resolved, env: DistEnv) -> None:
    """Print what was adjusted at start (e.g. a lowered micro_batch), once (rank 0)."""
    if env.is_main:
        for note in resolved.notes:
            print(f"note: {note}")


def resolve_resume(run_path: Path, files: list[str], overrides: list[str]) -> tuple[Resolved, Path]:
    """Config of a run being resumed; refuses changes that would alter the run."""
    saved = run_path / "config.yaml"
    if not run_path.is_dir():
        raise UsageError(f"--resume {run_path}: no such run directory. `plinth runs` lists runs.")
    if not saved.is_file():
        raise UsageError(
            f"--resume {run_path}: it has no config.yaml, so it is not a plinth run directory "
            "(or it was deleted). Point --resume at a directory under runs/."
        )
    original = load_config([saved]).config
    resolved = load_config([saved, *files], overrides)
    changed = [
        key
        for key, _ in leaf_fields()
        if get_value(original, key) != get_value(resolved.config, key)
        and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        details = ", ".join(
            f"{k}: {get_value(original, k)!r} -> {get_value(resolved.config, k)!r}"
            for k in changed[:6]
        )
        raise UsageError(
            f"--resume {run_path}: the given config differs from the run's own ({details}). "
            "A resumed run must keep its model, data and optimizer settings; drop those "
            "overrides, or start a new run."
        )
    return resolved, run_path


def open_run(cfg, env: DistEnv, run_path: Path | None, default_name: str) -> RunDir | RunPaths:
    """The run directory: `run_path` (resume) or a new unique one picked by rank 0 and broadcast;
    RunDir on rank 0 (which writes), RunPaths elsewhere. Needs the process group."""
    if run_path is None and env.is_main:
        name = cfg.tracking.run_name or default_name
        run_path = unique_run_path(cfg.tracking.output_dir, name)
    run_path = Path(broadcast_object(str(run_path), env))
    return RunDir(run_path) if env.is_main else RunPaths(run_path)


def print_train_summary(result) -> None:
    """The closing lines of a training command: steps, tokens, losses, where the run is."""
    import math

    loss = result.train_loss
    known = loss is not None and math.isfinite(loss)
    if getattr(result, "complete", False):
        print(
            f"nothing to do: {result.run_dir} had already finished (step {result.step}, "
            f"{result.tokens:,} tokens" + (f", final train loss {loss:.4f}" if known else "")
            + "). To train further, resume a pretraining run with a higher pretrain.max_steps, "
            "or start a new run."
        )
        return
    val = result.val
    parts = [f"trained {result.step} steps, {result.tokens:,} tokens"]
    if known:
        parts.append(f"final train loss {loss:.4f}")
    if val:
        parts.append(f"val loss {val['val/loss']:.4f}")
        if "val/bpb" in val:
            parts.append(f"{val['val/bpb']:.3f} bits/byte")
    if result.stopped_early:
        parts.append("stopped early")
    if getattr(result, "ended_by", ""):
        parts.append(f"ended by {result.ended_by}")
    print("; ".join(parts))
    print(f"run: {result.run_dir}")
