"""`plinth align`: preference tuning, reward models and RL from rewards, through the one loop.

    plinth align configs/dpo-smollm2-lora.yaml
    plinth align configs/dpo-smollm2-lora.yaml align.method=reward tracking.run_name=rm-concise
    plinth align configs/grpo-arithmetic.yaml
    plinth align --resume runs/dpo-smollm2-lora

The base model, the parameter-efficient method, lengths and chat template come from the
`finetune` section as in SFT; `align` says what is optimised (dpo, simpo, orpo, kto, reward,
grpo, rloo) and where its data is. The run directory is a normal plinth run (metrics carry
rewards, margins, accuracy, KL; samples show answers as training goes) plus adapter/ for
parameter-efficient methods. docs/alignment.md says which method when.
"""

from __future__ import annotations

from pathlib import Path

from plinth.config.load import Resolved, split_args
from plinth.distributed.env import DistEnv
from plinth.errors import PlinthError, UsageError
from plinth.finetune.config import load_finetune_config
from plinth.train.hooks import Hooks
from plinth.train.setup import print_train_summary, resolve_resume


def align(
    config: str | None = None,
    overrides: list[str] = (),
    *,
    resume: str | None = None,
    quiet: bool = False,
) -> int:
    """Align a model: DPO / SimPO / ORPO / KTO on preference data, a reward model, or GRPO / RLOO
    from reward functions; with full fine-tuning or LoRA & co (finetune.method).

    Writes a run directory like fine-tuning (config, manifest, metrics with rewards and
    margins, samples, checkpoints) plus adapter/ for parameter-efficient methods.

    Args:
        config: YAML config file or shipped recipe name (optional with --resume)
        overrides: key=value changes, e.g. align.beta=0.2 align.loss_type=ipo
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
                "give a config file, e.g. `plinth align configs/dpo-smollm2-lora.yaml`"
            )
        resolved, base_dir = load_finetune_config(files, overs)
        run_path = None
    result = run_alignment(resolved, base_dir, run_path=run_path, progress=not quiet)
    if DistEnv.from_environ().is_main:
        print_train_summary(result)
        cfg = resolved.config
        if not result.complete and cfg.align.method == "reward":
            print(f"score texts with it: plinth classify {result.run_dir} --text \"...\"")
        elif not result.complete:
            print(f"try it: plinth generate {result.run_dir} --chat --prompt \"...\"")
    if result.halted:
        raise PlinthError(
            f"training halted after step {result.step}: the stability guard saw a problem it "
            f"could not roll back from (anomaly events in {result.run_dir / 'events.jsonl'}). "
            "Lower optim.lr or check the data, then resume or restart."
        )
    return 0


def build_align_task(cfg, base_dir: Path):
    """The task of `align.method`: fixed preference/unpaired rows, or online RL."""
    if cfg.align.data_kind == "prompt":
        from plinth.align.rl import build_rl_task

        return build_rl_task(cfg, base_dir)
    from plinth.align.task import build_preference_task

    return build_preference_task(cfg, base_dir)


def run_alignment(
    resolved: Resolved,
    base_dir: Path | None,
    run_path: Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
):
    """Read the data, create (or reopen) the run directory and train (plinth.finetune.run).
    Returns a TrainResult."""
    from plinth.finetune.run import run_task

    def hooks(task, placement):
        return Hooks(sample=task.samples)

    return run_task(resolved, base_dir, build_align_task, hooks, recipe="align",
                    run_path=run_path, progress=progress, stop_after=stop_after)
