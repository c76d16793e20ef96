"""`plinth pretrain`: train a model from scratch on a prepared corpus.

    plinth pretrain configs/quickstart.yaml pretrain.max_steps=100
    plinth pretrain --resume runs/quickstart          # continue a killed run exactly

The recipe resolves the config, prepares (or reuses) the dataset, creates the run directory
(config.yaml, manifest.json, tokenizer.json, metrics/events/samples, checkpoints) and hands
everything to the one training loop.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from plinth.config.checks import environment_warnings, reject_unsupported
from plinth.config.load import Resolved, get_value, leaf_fields, load_config, split_args
from plinth.config.render import render_yaml
from plinth.distributed.env import DistEnv
from plinth.errors import PlinthError, UsageError

# options pretraining does not honour yet; refusing beats silently ignoring them
UNSUPPORTED = {
    "compress.quantization": "quantisation is applied to a trained model, not during pretraining",
    "compress.pruning": "pruning is applied to a trained model, not during pretraining",
    "compress.distill_teacher": "distillation is its own recipe",
    "finetune.base": "starting from a pretrained model is `plinth finetune`",
}
# keys a resumed run may change; anything else would silently alter the run being continued
RESUMABLE_CHANGES = (
    "pretrain.max_steps",
    "pretrain.max_tokens",
    "pretrain.max_epochs",
    "tracking.",
    "hardware.num_workers",
    "inference.",
)


def pretrain(
    config: str | None = None,
    overrides: list[str] = (),
    *,
    resume: str | None = None,
    quiet: bool = False,
) -> int:
    """Pretrain a model from scratch (decoder: clm, encoder: mlm, encoder_decoder: span).

    Writes a run directory under tracking.output_dir with the resolved config, a manifest,
    metrics, events, samples and checkpoints.

    Args:
        config: YAML config file or shipped recipe name (optional with --resume)
        overrides: key=value changes, e.g. pretrain.max_steps=200 optim.lr=1e-3
        resume: run directory to continue from its latest intact checkpoint
        quiet: no progress bar or per-step lines
    """
    files, overs = split_args([config] if config else [], overrides)
    if resume is not None:
        resolved, run_path = resolve_resume(Path(resume), files, overs)
    else:
        if not files:
            raise UsageError("give a config file, e.g. `plinth pretrain configs/quickstart.yaml`")
        resolved, run_path = load_config(files, overs), None
    result = run_pretraining(resolved, run_path=run_path, progress=not quiet)
    if DistEnv.from_environ().is_main:
        print_summary(result)
    if result.halted:
        raise PlinthError(
            f"training halted after step {result.step}: the stability guard saw a problem it could "
            f"not roll back from (anomaly events in {result.run_dir / 'events.jsonl'}). Lower "
            "optim.lr, raise optim.warmup_steps or check the data, then resume or restart."
        )
    return 0


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


def run_pretraining(
    resolved: Resolved,
    run_path: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    fault_hook=None,
):
    """Prepare data, create (or reopen) the run directory and train. Returns a TrainResult.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0 prepares the data and picks
    the run directory, the others wait for it, and all train together."""
    from plinth.data import open_dataset, prepare_dataset
    from plinth.distributed.env import (
        barrier,
        broadcast_object,
        destroy_process_group,
        init_process_group,
    )
    from plinth.track.run import build_manifest
    from plinth.train.loop import train
    from plinth.train.memory import check_fits

    cfg = resolved.config
    env, device, strategy = start(resolved, UNSUPPORTED, "pretrain")
    try:
        accum = cfg.optim.accum_steps(cfg.model.max_seq_len, env.world_size)
    except ValueError as e:
        raise UsageError(f"{e} (torchrun started {env.world_size} processes)") from None
    check_fits(
        cfg,
        device,
        devices=env.world_size,
        strategy=strategy,
        ranks_here=env.local_world_size,
    )
    init_process_group(cfg, env, device)
    try:
        # rank 0 prepares (or reuses) the dataset; the others then open the finished one
        data_dir: str | PlinthError | None = None
        if env.is_main:
            try:
                data_dir = str(prepare_dataset(cfg, progress=progress))
            except PlinthError as e:  # tell the other ranks instead of leaving them waiting
                data_dir = e
        data_dir = broadcast_object(data_dir, env)
        if isinstance(data_dir, PlinthError):
            raise data_dir
        ds = open_dataset(data_dir)
        resuming = run_path is not None
        run = open_run(cfg, env, run_path, f"pretrain-{cfg.model.arch}")
        try:
            if env.is_main and not resuming:
                run.write_config(render_yaml(resolved))
                shutil.copyfile(Path(ds.path) / "tokenizer.json", run.path / "tokenizer.json")
                run.write_manifest(
                    build_manifest(
                        seed=cfg.seed,
                        world_size=env.world_size,
                        device=str(device),
                        data={"dir": str(ds.path), "fingerprint": ds.fingerprint},
                        distributed={
                            "strategy": strategy,
                            "accum_steps": accum,
                            "nodes": env.world_size // env.local_world_size,
                        },
                    )
                )
                print(f"run directory: {run.path}")
                if env.distributed:
                    print(f"torchrun: {env.world_size} processes, strategy {strategy}")
            barrier(env)
            return train(
                cfg,
                ds,
                run,
                resume=resuming,
                progress=progress,
                stop_after=stop_after,
                fault_hook=fault_hook,
                env=env,
            )
        finally:
            run.close()
    finally:
        destroy_process_group()


def start(resolved: Resolved, unsupported: dict, recipe: str):
    """What every training recipe does first: refuse options it does not honour, print
    environment warnings (rank 0), pick the device and the distributed strategy.
    Returns (DistEnv, device, strategy)."""
    from plinth.distributed.env import check_strategy, device_for
    from plinth.train.loop import resolve_device

    cfg = resolved.config
    env = DistEnv.from_environ()
    reject_unsupported(resolved, unsupported, recipe)
    if env.is_main:
        for warning in environment_warnings(resolved):
            print(f"warning: {warning}")
    device = device_for(cfg, env, resolve_device(cfg))
    return env, device, check_strategy(cfg, env, device)


def open_run(cfg, env: DistEnv, run_path: Path | None, default_name: str):
    """The run directory: `run_path` (resume) or a new unique one picked by rank 0 and broadcast;
    RunDir on rank 0 (which writes), RunPaths elsewhere. Needs the process group."""
    from plinth.distributed.env import broadcast_object
    from plinth.track.run import RunDir, RunPaths, unique_run_path

    if run_path is None and env.is_main:
        name = cfg.tracking.run_name or default_name
        run_path = unique_run_path(cfg.tracking.output_dir, name)
    run_path = Path(broadcast_object(str(run_path), env))
    return RunDir(run_path) if env.is_main else RunPaths(run_path)


def print_summary(result) -> None:
    val = result.val
    parts = [
        f"trained {result.step} steps, {result.tokens:,} tokens",
        f"final train loss {result.train_loss:.4f}",
    ]
    if val:
        parts.append(f"val loss {val['val/loss']:.4f}")
        if "val/bpb" in val:
            parts.append(f"{val['val/bpb']:.3f} bits/byte")
    if result.stopped_early:
        parts.append("stopped early")
    print("; ".join(parts))
    print(f"run: {result.run_dir}")
