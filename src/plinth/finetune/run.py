"""Running a fine-tune-like task through the one loop: the run directory (config, manifest,
tokenizer files), training, and the final adapter/. `plinth finetune` and `plinth align` both
come here with their own task and hooks.

    python -c "from plinth.finetune.run import run_task; help(run_task)"
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from plinth.config.load import Resolved
from plinth.config.preflight import UNSUPPORTED_BY, preflight
from plinth.config.render import render_yaml
from plinth.errors import UsageError
from plinth.train.hooks import Hooks
from plinth.train.setup import open_run, say_notes, start

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja")


def run_task(
    resolved: Resolved,
    base_dir: Path | None,
    build: Callable,
    hooks: Callable,
    *,
    recipe: str = "finetune",
    run_path: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
):
    """Build the task (`build(cfg, base_dir)`, reading the data before anything is written),
    create (or reopen) the run directory and train. `hooks(task, placement)` gives the loop's
    Hooks. Returns a TrainResult. On resume (`run_path` given) the weights come from the run's
    checkpoints, not the base."""
    from plinth.distributed.env import barrier, destroy_process_group, init_process_group
    from plinth.finetune.base import base_info
    from plinth.load import check_base_weights, find_run, finetune_base_dir, read_json, resolve
    from plinth.track.run import build_manifest
    from plinth.train.loop import train

    cfg = resolved.config
    placement = start(resolved, UNSUPPORTED_BY[recipe], recipe)
    env, device, strategy = placement.env, placement.device, placement.strategy
    resuming = run_path is not None
    accum = preflight(resolved, env.world_size, recipe)  # what `config validate` checks too
    say_notes(resolved, env)
    if base_dir is None:
        base_dir = Path(run_path) if resuming else resolve(cfg.finetune.base, "finetune.base")
    if not resuming:
        check_base_weights(base_dir)  # before anything is written
    task = build(cfg, base_dir)
    heads = getattr(task, "tasks", None)
    if heads and any(t.kind != "lm" for t in heads.values()) and strategy != "none":
        raise UsageError(
            f"distributed.strategy={strategy}: task heads (classification/regression) train in "
            "one process for now; run without torchrun. Language-model fine-tuning (task=lm) "
            "runs under ddp/fsdp."
        )
    # tasks are loaded (and misconfigurations refused) before any training
    loop_hooks: Hooks = hooks(task, placement)
    task.verbose = env.is_main
    if resuming:  # a full fine-tune's checkpoints hold every weight; others only the trained
        recorded = read_json(base_dir / "manifest.json").get("base") if (
            base_dir / "manifest.json").is_file() else None
        task.base_dir = None if cfg.finetune.method == "full" else finetune_base_dir(
            cfg, recorded if isinstance(recorded, dict) else None)
    steps = task.total_steps(0, accum * env.world_size)
    if env.is_main:
        print(f"training for {steps} steps, set by {task.limit}")
    init_process_group(cfg, env, device)
    try:
        run = open_run(cfg, env, run_path, f"{recipe}-{cfg.finetune.method}")
        try:
            if env.is_main and not resuming:
                run.write_config(render_yaml(resolved))
                text_dir = find_run(base_dir)[0]  # a checkpoint's tokenizer is its run's
                for f in COPIED:
                    if (text_dir / f).is_file():
                        shutil.copyfile(text_dir / f, run.path / f)
                run.write_manifest(
                    build_manifest(
                        seed=cfg.seed,
                        world_size=env.world_size,
                        device=str(device),
                        data=task.data_record(),
                        base=base_info(base_dir),
                        distributed={"strategy": strategy},
                    )
                )
                print(f"run directory: {run.path}")
                for line in task.data_lines():
                    print(line)
            barrier(env)
            result = train(
                cfg,
                task,
                run,
                placement=placement,
                hooks=loop_hooks,
                resume=resuming,
                progress=progress,
                stop_after=stop_after,
            )
            if result.complete:
                return result
            if result.stopped_early:
                result.ended_by = "early stopping (optim.early_stop)"
            elif result.step >= steps:
                result.ended_by = task.limit
            if cfg.finetune.method != "full" and task.model is not None:
                model = task.model
                if strategy in ("fsdp", "hsdp"):  # gathered by every rank, saved by the first
                    model = unsharded_copy(task.model, cfg, env)
                if env.is_main:
                    save_final_adapter(model, run.path, base_dir)
            return result
        finally:
            run.close()
    finally:
        destroy_process_group()

def unsharded_copy(model, cfg, env):
    """A single-process copy of an FSDP-sharded fine-tune model on the first rank (None on the
    others). Collective: every rank calls it."""
    from plinth.load import build_finetune_model
    from plinth.train.state import full_model_state, load_weights

    state = full_model_state(model, env)
    if not env.is_main:
        return None
    plain = build_finetune_model(cfg, None)
    load_weights(plain, state)
    return plain


def save_final_adapter(model, run: Path, base_dir: Path) -> Path | None:
    """adapter/ in the run: the trained method alone (PEFT's layout where peft can express it).
    Heads are not part of it; they live in the run's checkpoints."""
    from plinth.hf.layout import IMPORT_FILE
    from plinth.peft.save import save_adapter

    base = str(base_dir) if (base_dir / IMPORT_FILE).is_file() else None
    path = save_adapter(model, run / "adapter", base)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"adapter: {path} ({size:.1f} MB)")
    return path
