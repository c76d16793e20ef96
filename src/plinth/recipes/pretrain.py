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

from plinth.config.load import Resolved, load_config, split_args
from plinth.config.preflight import UNSUPPORTED_BY, preflight
from plinth.config.render import render_yaml
from plinth.config.schema import Config
from plinth.distributed.env import DistEnv
from plinth.errors import PlinthError, UsageError
from plinth.train.hooks import Hooks
from plinth.train.setup import open_run, print_train_summary, resolve_resume, say_notes, start

# options pretraining does not honour yet; refusing beats silently ignoring them
UNSUPPORTED = UNSUPPORTED_BY["pretrain"]


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
        print_train_summary(result)
    if result.halted:
        raise PlinthError(
            f"training halted after step {result.step}: the stability guard saw a problem it could "
            f"not roll back from (anomaly events in {result.run_dir / 'events.jsonl'}). Lower "
            "optim.lr, raise optim.warmup_steps or check the data, then resume or restart."
        )
    return 0


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
    from plinth.eval.periodic import TaskScorer
    from plinth.track.run import build_manifest
    from plinth.train.loop import train
    from plinth.train.memory import check_fits
    from plinth.train.task import PretrainTask

    cfg = resolved.config
    placement = start(resolved, UNSUPPORTED, "pretrain")
    env, device, strategy = placement.env, placement.device, placement.strategy
    accum = preflight(resolved, env.world_size)  # what `plinth config validate` checks too
    say_notes(resolved, env)
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
                if run_path is not None:  # refused before any data work: never rebuilt
                    data_dir = str(_resume_data(cfg, run_path, progress))
                else:
                    data_dir = str(prepare_dataset(cfg, progress=progress))
            except PlinthError as e:  # tell the other ranks instead of leaving them waiting
                data_dir = e
        data_dir = broadcast_object(data_dir, env)
        if isinstance(data_dir, PlinthError):
            raise data_dir
        ds = open_dataset(data_dir)
        task = PretrainTask(cfg, ds)
        # tasks are loaded (and misconfigurations refused) before any training
        score = TaskScorer.create(cfg, task, placement.sharded)
        hooks = Hooks(sample=text_sampler(cfg, ds), score=score)
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
                task,
                run,
                placement=placement,
                hooks=hooks,
                resume=resuming,
                progress=progress,
                stop_after=stop_after,
                fault_hook=fault_hook,
            )
        finally:
            run.close()
    finally:
        destroy_process_group()


def _resume_data(cfg: Config, run_path: Path, progress: bool) -> Path:
    """The dataset of a run being resumed, once the run can be resumed at all: the dataset
    is used as it is (not rebuilt), and must be the one the run recorded."""
    import json

    from plinth.data.prepare import resume_dataset
    from plinth.track.checkpoints import list_checkpoints

    if not list_checkpoints(run_path / "checkpoints"):  # as the training loop would say
        raise UsageError(
            f"no usable checkpoint under {run_path / 'checkpoints'} (none were written). Start a "
            "new run instead of resuming, or point --resume at a run that saved a checkpoint."
        )
    try:
        recorded = json.loads((run_path / "manifest.json").read_text())["data"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None  # no record to compare with: the dataset is still not rebuilt
    return resume_dataset(cfg, recorded, f"run {run_path}", progress)


def text_sampler(cfg: Config, ds):
    """The sample hook of a pretraining run: continuations of `tracking.sample_prompts`
    (decoders only), drawn from a generator seeded by the step, so sampling never disturbs
    the training RNG. No prompts (`tracking.sample_prompts=[]`): no samples."""
    if cfg.model.arch != "decoder" or not cfg.tracking.sample_prompts:
        return None

    def sample(model, step: int, device) -> list[tuple[str, str]]:
        import torch

        from plinth.infer.sampling import generate

        inf = cfg.inference
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + step)
        prompts = list(cfg.tracking.sample_prompts)
        ids = [ds.tokenizer.encode(p).ids or [ds.bos_id] for p in prompts]
        was_training = model.training
        model.eval()
        outs = generate(
            model,
            ids,
            max_new_tokens=min(inf.max_new_tokens, 48),
            temperature=inf.temperature,
            top_k=inf.top_k,
            top_p=inf.top_p,
            eos_id=ds.eos_id,
            generator=gen,
        )
        model.train(was_training)
        return [(p, ds.tokenizer.decode(o)) for p, o in zip(prompts, outs, strict=True)]

    return sample
