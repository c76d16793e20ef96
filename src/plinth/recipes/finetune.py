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

from pathlib import Path

from plinth.config.load import Resolved, split_args
from plinth.config.preflight import UNSUPPORTED_BY
from plinth.distributed.env import DistEnv
from plinth.errors import PlinthError, UsageError
from plinth.finetune.config import load_finetune_config
from plinth.train.hooks import Hooks
from plinth.train.setup import print_train_summary, resolve_resume

UNSUPPORTED = UNSUPPORTED_BY["finetune"]  # options fine-tuning refuses (config validate too)


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
    """Read the data, create (or reopen) the run directory and train (plinth.finetune.run).
    Returns a TrainResult. On resume (`run_path` given) the weights come from the run's
    checkpoints, not the base."""
    from plinth.eval.periodic import TaskScorer
    from plinth.finetune.run import run_task
    from plinth.finetune.task import build_task

    def hooks(task, placement):
        return Hooks(sample=task.samples,
                     score=TaskScorer.create(resolved.config, task, placement.sharded))

    return run_task(resolved, base_dir, build_task, hooks, recipe="finetune", run_path=run_path,
                    progress=progress, stop_after=stop_after)
