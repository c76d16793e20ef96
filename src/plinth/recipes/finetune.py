"""`plinth finetune`: adapt a pretrained model to your data, through the one training loop.

    plinth finetune configs/sft-smollm2-lora.yaml
    plinth finetune configs/cls-minilm.yaml finetune.method=full optim.lr=5e-5
    plinth finetune --resume runs/sft-smollm2-lora

The base (`finetune.base`) fixes the architecture and tokenizer (its config is the lowest
layer of the fine-tune's config); the method (full, LoRA, QLoRA, ...) and heads are applied
to it; the run directory is a normal plinth run (config, manifest, metrics, events, samples,
checkpoints, report) plus, for parameter-efficient methods, `adapter/` in the PEFT library's
format (small; `peft.PeftModel.from_pretrained` loads it onto the base).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from plinth.config.load import Resolved, split_args
from plinth.config.preflight import UNSUPPORTED_BY, preflight
from plinth.config.render import render_yaml
from plinth.distributed.env import DistEnv
from plinth.errors import PlinthError, UsageError
from plinth.finetune.config import load_finetune_config
from plinth.train.hooks import Hooks
from plinth.train.setup import open_run, print_train_summary, resolve_resume, say_notes, start

UNSUPPORTED = UNSUPPORTED_BY["finetune"]  # options fine-tuning refuses (config validate too)
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja")


def finetune(
    config: str | None = None,
    overrides: list[str] = (),
    *,
    resume: str | None = None,
    quiet: bool = False,
) -> int:
    """Fine-tune a pretrained model: full, LoRA/DoRA/QLoRA, adapters, prefix or IA3; SFT on
    instruction data, or classification/regression heads; several tasks at once.

    Writes a run directory like pretraining (config, manifest, metrics, samples, checkpoints)
    plus adapter/ (PEFT format) for parameter-efficient methods.

    Args:
        config: YAML config file or shipped recipe name (optional with --resume)
        overrides: key=value changes, e.g. finetune.rank=16 optim.lr=2e-4
        resume: run directory to continue from its latest intact checkpoint
        quiet: no progress bar or per-step lines
    """
    files, overs = split_args([config] if config else [], overrides)
    if resume is not None:
        resolved, run_path = resolve_resume(Path(resume), files, overs)
        base_dir = None
    else:
        if not files and not overs:
            raise UsageError(
                "give a config file, e.g. `plinth finetune configs/sft-smollm2-lora.yaml`"
            )
        resolved, base_dir = load_finetune_config(files, overs)
        run_path = None
    result = run_finetuning(resolved, base_dir, run_path=run_path, progress=not quiet)
    if DistEnv.from_environ().is_main:
        print_train_summary(result)
        if result.complete:
            return 0
        if resolved.config.model.arch == "decoder" and resolved.config.finetune.task == "lm" \
                and not resolved.config.finetune.tasks:
            from plinth.load import chat_template_source

            templated = resolved.config.finetune.chat_template != "none" and \
                chat_template_source("auto", Path(result.run_dir)) is not None
            chat = " --chat" if templated else ""
            print(f"try it: plinth generate {result.run_dir}{chat} --prompt \"...\"")
    if result.halted:
        raise PlinthError(
            f"training halted after step {result.step}: the stability guard saw a problem it "
            f"could not roll back from (anomaly events in {result.run_dir / 'events.jsonl'}). "
            "Lower optim.lr or check the data, then resume or restart."
        )
    return 0


def run_finetuning(
    resolved: Resolved,
    base_dir: Path | None,
    run_path: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
):
    """Read the data, create (or reopen) the run directory and train. Returns a TrainResult.
    On resume (`run_path` given) the weights come from the run's checkpoints, not the base."""
    from plinth.distributed.env import barrier, destroy_process_group, init_process_group
    from plinth.eval.periodic import TaskScorer
    from plinth.finetune.base import base_info
    from plinth.finetune.task import build_task
    from plinth.load import (
        check_base_weights,
        find_run,
        finetune_base_dir,
        read_json,
        resolve,
    )
    from plinth.track.run import build_manifest
    from plinth.train.loop import train

    cfg = resolved.config
    placement = start(resolved, UNSUPPORTED, "finetune")
    env, device, strategy = placement.env, placement.device, placement.strategy
    resuming = run_path is not None
    accum = preflight(resolved, env.world_size, "finetune")  # what `config validate` checks too
    say_notes(resolved, env)
    if base_dir is None:
        base_dir = Path(run_path) if resuming else resolve(cfg.finetune.base, "finetune.base")
    if not resuming:
        check_base_weights(base_dir)  # before anything is written
    task = build_task(cfg, base_dir)
    if any(t.kind != "lm" for t in task.tasks.values()) and strategy != "none":
        raise UsageError(
            f"distributed.strategy={strategy}: task heads (classification/regression) train in "
            "one process for now; run without torchrun. Language-model fine-tuning (task=lm) "
            "runs under ddp/fsdp."
        )
    # tasks are loaded (and misconfigurations refused) before any training
    hooks = Hooks(sample=task.samples, score=TaskScorer.create(cfg, task, placement.sharded))
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
        run = open_run(cfg, env, run_path, f"finetune-{cfg.finetune.method}")
        try:
            if env.is_main and not resuming:
                run.write_config(render_yaml(resolved))
                text_dir = find_run(base_dir)[0]  # a checkpoint's tokenizer is its run's
                for f in COPIED:
                    if (text_dir / f).is_file():
                        shutil.copyfile(text_dir / f, run.path / f)
                data = {
                    name: {
                        "train_rows": len(t.train),
                        "val_rows": len(t.val) if t.val is not None else 0,
                        **{f"train_{k}": v for k, v in t.train.counts.items()},
                    }
                    for name, t in task.tasks.items()
                }
                run.write_manifest(
                    build_manifest(
                        seed=cfg.seed,
                        world_size=env.world_size,
                        device=str(device),
                        data={"tasks": data},
                        base=base_info(base_dir),
                        distributed={"strategy": strategy},
                    )
                )
                print(f"run directory: {run.path}")
                for name, t in task.tasks.items():
                    c = t.train.counts
                    extra = ", ".join(f"{v} {k}" for k, v in c.items() if k in (
                        "truncated", "dropped") and v)
                    print(
                        f"task {name} ({t.kind}): {len(t.train)} training rows from "
                        f"{c.get('kept', len(t.train))} examples"
                        + (f" ({extra}, finetune.overlong={cfg.finetune.overlong})"
                           if extra else "")
                    )
            barrier(env)
            result = train(
                cfg,
                task,
                run,
                placement=placement,
                hooks=hooks,
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
