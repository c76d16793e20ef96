"""The one training loop, for every objective and architecture. Read it top to bottom.

    plinth pretrain configs/quickstart.yaml pretrain.max_steps=50

Per optimizer step: accumulate `accum` micro-batches (loss / accum, backward), clip the
gradient norm (the pre-clip norm is logged), let the stability guard judge the step, step
optimizer and schedule. Every `tracking.log_every` steps a metrics record; every `eval_every` a
validation pass (loss, perplexity, bits per byte) and the early-stop check; every
`sample_every` text from the sample hook; every `checkpoint_every` an atomic checkpoint.
Resume restores weights, optimizer, schedule, data position and every RNG, so N + N steps
equal 2N steps bit for bit on CPU.

What is trained comes from a `Task` (plinth.train.task): pretraining (`PretrainTask`) and
fine-tuning (`plinth.finetune.FinetuneTask`) give it the model, batches, loss and validation,
and share everything else here. Periodic work from higher layers (text samples, task scores)
arrives as `Hooks` (plinth.train.hooks) the recipe passes.

Under torchrun every rank runs this same loop on its own slice of each global batch
(`distributed.strategy` ddp/fsdp/hsdp, see plinth.distributed); the step loss, validation
loss and norms are reduced over ranks, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plinth.config.schema import Config
from plinth.distributed.device import Placement, autocast_context
from plinth.distributed.env import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    collective_failure,
    is_collective_failure,
)
from plinth.distributed.parallelize import grad_sync, parallelize
from plinth.errors import PlinthError, UsageError
from plinth.track.checkpoints import checkpoint_step, list_checkpoints, step_dir
from plinth.track.hardware import memory_mb, peak_flops
from plinth.track.progress import TrainProgress
from plinth.track.run import RunDir
from plinth.train import state as ckpt
from plinth.train.hooks import Hooks
from plinth.train.optim import build_optimizer, build_scheduler
from plinth.train.records import MetricWindow, local_shard, update_ratio, val_summary
from plinth.train.stability import Decision, StabilityGuard
from plinth.train.task import PretrainTask, Task

RANK_SEED = 1_000_003  # rank r > 0 draws dropout/masks from seed + r * RANK_SEED

FaultHook = Callable[[int, torch.Tensor], torch.Tensor]
"""fault_hook(micro_batch_index, loss) -> loss: chaos testing of the stability guard. The index
counts micro-batches drawn from the loader, so a poisoned batch stays poisoned data: after a
rollback the loader has moved past it, exactly as with a real bad batch."""


@dataclass
class TrainResult:
    step: int
    tokens: int
    train_loss: float
    val: dict = field(default_factory=dict)
    best_val_loss: float = math.inf
    stopped_early: bool = False
    halted: bool = False
    run_dir: Path | None = None
    complete: bool = False  # resumed a run that had already finished: nothing was trained
    ended_by: str = ""  # which limit ended the run (set by recipes that know, e.g. finetune)


@dataclass
class Step:
    """What one optimizer step measured."""

    loss: float
    tokens: int
    data_time: float
    grad_norm: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)  # the task's own (mean over the batch)


COUNTERS = ("step", "tokens", "best_val", "bad_evals", "best_path", "micro")


@dataclass
class TrainState:
    """Where training stands. `COUNTERS` is what a checkpoint carries (its
    train_state["counters"], under these names); the window only feeds the next metrics record."""

    step: int = 0
    tokens: int = 0
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    best_path: str | None = None  # checkpoint with the best validation loss, kept by pruning
    micro: int = 0  # micro-batches drawn from the loader (what fault_hook indexes)
    last_loss: float = math.nan  # the latest step's loss (checkpoints record it)
    window: MetricWindow = field(default_factory=MetricWindow)

    def counters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COUNTERS}

    def load_counters(self, counters: dict[str, Any], *, keep_micro: bool = False) -> None:
        """Take a checkpoint's counters; a rollback keeps `micro`, leaving bad batches skipped."""
        for name, value in counters.items():
            if name in COUNTERS and not (keep_micro and name == "micro"):
                setattr(self, name, value)

    def advance(self, step: Step, seconds: float, clipped: bool) -> None:
        """Count a finished optimizer step."""
        self.step += 1
        self.tokens += step.tokens
        self.last_loss = step.loss
        w = self.window
        w.loss += step.loss
        w.steps += 1
        w.tokens += step.tokens
        w.time += seconds
        w.step_times.append(seconds)
        w.data += step.data_time
        w.clipped += clipped
        w.add_task(step.metrics)


@dataclass
class _Parts:
    """What one `train` call works with: built once, then read by every named step."""

    cfg: Config
    task: Task
    run: RunDir
    placement: Placement
    hooks: Hooks
    model: torch.nn.Module  # what is saved (the FSDP root when sharded)
    net: torch.nn.Module  # what forward/backward run through
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    guard: StabilityGuard
    log: Any  # MetricLogger on rank 0, _NullLogger elsewhere
    mask_gen: torch.Generator
    accum: int
    steps: int
    tokens_per_step: int
    fault_hook: FaultHook | None
    fp16: bool  # fp16 on a GPU: gradients go through a loss scaler
    scaler: Any  # torch.amp.GradScaler, or None
    clip: float  # max gradient norm (inf: measure, never clip)
    trainable: list[torch.Tensor]
    flops_per_token: float
    peak: float  # peak FLOP/s of all ranks together (0 when unknown: no MFU)
    amp: Any = None  # the autocast context every forward runs in

    @property
    def env(self) -> DistEnv:
        return self.placement.env

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def evaluator(self) -> torch.nn.Module:
        # replicas evaluate the bare model: DDP's forward would sync buffers
        return self.model if self.placement.strategy == "ddp" else self.net


def train(
    cfg: Config,
    data,
    run: RunDir,
    *,
    placement: Placement | None = None,
    hooks: Hooks | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    fault_hook: FaultHook | None = None,
) -> TrainResult:
    """Train on `data` (a `Task`, or a prepared dataset: pretraining), writing everything into
    `run`. The recipe hands in the `placement` (rank, device, strategy; one process on the
    configured device when omitted) and the `hooks`.

    `stop_after` ends this call after that many optimizer steps (tests use it to simulate an
    interruption); the run is then resumable like a killed one. Under torchrun every rank
    calls it; `run` is the same directory on all (only rank 0 writes to it).
    """
    placement = placement or Placement.resolve(cfg)
    p = _assemble(cfg, data, run, placement, hooks or Hooks(), fault_hook)
    s = TrainState()
    if resume and _resume(p, s):  # the run had already finished: nothing to train or log
        p.log.close("finished")
        return TrainResult(s.step, s.tokens, s.last_loss, best_val_loss=s.best_val,
                           run_dir=run.path, complete=True)
    p.model.train()
    data_iter = iter(p.loader)
    result = TrainResult(s.step, s.tokens, math.nan, best_val_loss=s.best_val, run_dir=run.path)
    _log_start(p, s)
    sampler = _start_resource_sampler(p)
    status, steps_this_call = "failed", 0
    try:
        with TrainProgress(total=p.steps, start=s.step, enabled=progress and p.env.is_main) as bar:
            if p.task.baseline and s.step == 0:  # where a fine-tune starts from, to compare
                _baseline(p, bar)
            while s.step < p.steps:
                t0 = time.perf_counter()
                step = _accumulate(p, s, data_iter)
                decision = _guard(p, s, step, bar)
                if decision.action == "rollback" and _rollback(p, s, decision, bar):
                    continue
                if decision.action in ("halt", "rollback"):  # nowhere to roll back to: halt
                    result.halted = True
                    break
                log_now = s.step + 1 == p.steps or (s.step + 1) % cfg.tracking.log_every == 0
                before = [local_shard(w.detach()).clone() for w in p.trainable] if log_now else None
                lr = _optimizer_step(p, decision)
                s.advance(step, time.perf_counter() - t0, clipped=step.grad_norm > p.clip)
                steps_this_call, result.train_loss = steps_this_call + 1, step.loss
                _log(p, s, step, lr, before, bar)
                is_last = s.step == p.steps
                val = _evaluate(p, s, result, bar, is_last)
                is_last = is_last or result.stopped_early
                _score_tasks(p, s, bar, is_last)
                _sample(p, s.step, is_last)
                _checkpoint(p, s, val, is_last)
                if is_last or (stop_after is not None and steps_this_call >= stop_after):
                    break
        result.step, result.tokens = s.step, s.tokens
        status = _finish(p, s, result)
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: resumable from the last checkpoint
        status = "killed"
        raise
    except Exception as e:
        if p.env.distributed and is_collective_failure(e):
            raise collective_failure(e, p.env, s.step, cfg.distributed.timeout_s) from None
        raise
    finally:
        if sampler:
            sampler.stop()
        p.log.close(status if status in ("finished", "killed") else "failed")
    return result


# ------------------------------------------------------------------------------ setting up
def _assemble(
    cfg: Config, data, run: RunDir, placement: Placement, hooks: Hooks, fault_hook
) -> _Parts:
    """Model, parallelism, data, optimizer, schedule, guard and logger, in the order that fixes
    the random streams (so a rerun draws the same numbers)."""
    from plinth.track.sinks import MetricLogger, open_sinks

    env, device, strategy = placement.env, placement.device, placement.strategy
    task: Task = data if isinstance(data, Task) else PretrainTask(cfg, data)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = task.build_model(device)
    if env.rank:
        torch.manual_seed(cfg.seed + RANK_SEED * env.rank)  # own dropout; rank 0 = 1 process
    net = parallelize(model, cfg, env, device, strategy)
    try:  # the recipes already fitted micro_batch (preflight); a direct caller gets it here
        note = cfg.optim.fit_world(task.seq_len, env.world_size)
        accum = cfg.optim.accum_steps(task.seq_len, env.world_size)
    except ValueError as e:
        raise UsageError(f"{e}") from None
    if note and env.is_main:
        print(f"note: {note}")
    tokens_per_step = accum * cfg.optim.micro_batch * task.seq_len * env.world_size
    loader = task.loader(env)
    steps = task.total_steps(tokens_per_step, accum * env.world_size)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 2 + RANK_SEED * env.rank)
    guard = StabilityGuard(cfg.stability)
    if env.is_main:
        sinks = open_sinks(
            cfg.tracking.sinks, run.path, config=cfg.model_dump(), run_name=run.path.name
        )
        log = MetricLogger(run, sinks)
    else:
        log = _NullLogger()
    fp16 = cfg.hardware.precision == "fp16" and device.type == "cuda"
    return _Parts(
        cfg, task, run, placement, hooks, model, net, optimizer, scheduler, loader, guard, log,
        mask_gen, accum, steps, tokens_per_step, fault_hook,
        fp16=fp16,
        scaler=torch.amp.GradScaler(device.type) if fp16 else None,
        clip=cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf,
        trainable=[w for w in model.parameters() if w.requires_grad],
        flops_per_token=task.flops_per_token(model),
        peak=peak_flops(device) * env.world_size,
        amp=autocast_context(cfg, device),
    )


class _NullLogger:
    """What ranks other than 0 log to."""

    def log_metrics(self, step: int, /, **values) -> None:
        pass

    def log_event(self, step: int, kind: str, /, **details) -> None:
        pass

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass


def _resume(p: _Parts, s: TrainState) -> bool:
    """Continue from the newest intact checkpoint: rank 0 checks the checksums and that every
    file deserializes, and picks; the others load what it picked. True when that checkpoint
    ended the run (nothing left to train)."""
    env = p.env
    picked = None
    if env.is_main:
        try:
            latest = ckpt.load_latest(p.run.checkpoints, ckpt.RESUME_KEYS)
            picked = (str(latest.path), [(str(path), why) for path, why in latest.skipped])
        except PlinthError as e:
            picked = e
    picked = broadcast_object(picked, env)
    if isinstance(picked, PlinthError):
        raise picked
    loaded = ckpt.load_checkpoint(
        Path(picked[0]), [(Path(path), why) for path, why in picked[1]], check=False,
        required=ckpt.RESUME_KEYS,
    )
    for path, why in loaded.skipped:
        p.log.log_event(s.step, "checkpoint_skipped", path=path.name, reason=why)
        if env.is_main:
            print(f"warning: skipping checkpoint {path.name} ({why}); using {loaded.path.name}")
    _restore(p, s, loaded, with_data=True)
    last = loaded.meta.get("train_loss")
    s.last_loss = float(last) if isinstance(last, int | float) else math.nan
    es = p.cfg.optim.early_stop
    if s.step >= p.steps or (es.patience is not None and s.bad_evals >= es.patience):
        return True
    p.log.log_event(s.step, "resume", checkpoint=loaded.path.name, tokens=s.tokens)
    return False


def _restore(p: _Parts, s: TrainState, loaded: ckpt.Loaded, with_data: bool) -> None:
    """Weights, optimizer, schedule, counters (and, on resume, data position and RNG)."""
    loaded.load_into(p.model, p.optimizer)
    st = loaded.train_state
    p.scheduler.load_state_dict(st["scheduler"])
    p.guard.load_state_dict(st["guard"])
    s.load_counters(st["counters"], keep_micro=not with_data)
    if not with_data:  # a rollback leaves the data where it is: bad batches stay skipped
        return
    env, seed = p.env, p.cfg.seed
    p.loader.load_state_dict(st["loader"])  # global position: any world size
    mine = loaded.rank_state(env)
    if mine is not None:
        p.mask_gen.set_state(mine["mask_generator"])
        ckpt.set_rng_state(mine["rng"])
        return
    # another world size: fresh, deterministic random streams for this rank
    torch.manual_seed(seed + RANK_SEED * env.rank + s.step)
    p.mask_gen.manual_seed(seed + 2 + RANK_SEED * env.rank + s.step)
    if env.is_main:
        print(
            f"note: {loaded.path.name} was written by {st.get('world_size', 1)} process(es), "
            f"this job has {env.world_size}: data continues exactly, dropout/masking "
            "randomness restarts from the seed"
        )


def _log_start(p: _Parts, s: TrainState) -> None:
    p.log.log_event(
        s.step,
        "start",
        total_steps=p.steps,
        accum=p.accum,
        tokens_per_step=p.tokens_per_step,
        params=p.model.num_params(),
        device=str(p.device),
        world_size=p.env.world_size,
        strategy=p.placement.strategy,
    )


def _start_resource_sampler(p: _Parts):
    from plinth.track.sampler import ResourceSampler

    if not p.env.is_main:
        return None
    sampler = ResourceSampler(p.run.path / "system.jsonl", interval=10.0)
    sampler.start()
    return sampler


def _baseline(p: _Parts, bar: TrainProgress) -> None:
    """Step 0 of a fine-tune: the base model's validation and samples."""
    base_val = p.task.evaluate(p.evaluator, p.env, p.device)
    if base_val:
        p.log.log_metrics(0, tokens=0, **base_val)
        p.log.log_event(0, "eval", **base_val)
        bar.note(f"step 0 (the base model): {val_summary(base_val)}")
    _sample(p, 0, is_last=False, due=True)


# ------------------------------------------------------------------------- one training step
def _accumulate(p: _Parts, s: TrainState, data_iter) -> Step:
    """Forward and backward over `accum` micro-batches; the global batch's mean loss."""
    data_time, step_loss, step_tokens = 0.0, 0.0, 0
    metrics: dict[str, float] = {}
    for i in range(p.accum):
        td = time.perf_counter()
        batch = next(data_iter).to(p.device, non_blocking=True)
        data_time += time.perf_counter() - td
        with grad_sync(p.net, p.placement.strategy, sync=i == p.accum - 1):
            with p.amp:
                out = p.task.loss(p.net, batch, p.mask_gen)
            loss_value = out.loss if p.fault_hook is None else p.fault_hook(s.micro, out.loss)
            s.micro += 1
            step_tokens += p.task.batch_tokens(batch)  # after the loss: RL batches grow in it
            loss = loss_value / p.accum
            (p.scaler.scale(loss) if p.scaler else loss).backward()
        step_loss += (out.ce.item() if p.fault_hook is None else loss_value.item()) / p.accum
        for k, v in out.metrics.items():  # alignment: rewards, margins, KL, ...
            metrics[k] = metrics.get(k, 0.0) + float(v) / p.accum
    if p.env.distributed:  # the global batch's loss: same guard decision everywhere
        keys = sorted(metrics)
        sums = all_reduce_sum([step_loss, step_tokens, *(metrics[k] for k in keys)], p.env,
                              p.device)
        step_loss, step_tokens = sums[0] / p.env.world_size, int(sums[1])
        metrics = {k: v / p.env.world_size for k, v in zip(keys, sums[2:], strict=True)}
    return Step(step_loss, step_tokens, data_time, metrics=metrics)


def _guard(p: _Parts, s: TrainState, step: Step, bar: TrainProgress) -> Decision:
    """Clip the gradients, then let the stability guard judge the loss and the pre-clip norm."""
    if p.scaler:
        p.scaler.unscale_(p.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(), p.clip)
    step.grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    # fp16 overflow is the loss scaler's business (it skips the step itself)
    observed = None if (p.fp16 and not math.isfinite(step.grad_norm)) else step.grad_norm
    decision = p.guard.observe(s.step + 1, step.loss, observed)
    for det in decision.detections:
        p.log.log_event(det.step, "anomaly", **det.event())
    if decision.action == "halt":
        bar.note(
            f"step {s.step + 1}: halted by the stability guard "
            f"({', '.join(d.kind for d in decision.detections)})"
        )
    return decision


def _rollback(p: _Parts, s: TrainState, decision: Decision, bar: TrainProgress) -> bool:
    """Back to the newest intact checkpoint from before the blow-up (the data moves on, past
    the bad batches); False, with a halt recorded, when there is none."""
    # rank 0 checks checksums; everyone rolls back to the same checkpoint
    target = broadcast_object(
        _rollback_target(p.run, decision.bad_since) if p.env.is_main else None, p.env
    )
    if target is None:
        p.log.log_event(
            s.step + 1,
            "anomaly",
            type="blowup",
            action="halt",
            reason="no checkpoint older than the blow-up",
        )
        return False
    from_step = s.step + 1
    _restore(p, s, ckpt.load_checkpoint(target, check=False), with_data=False)
    p.guard.rolled_back(s.step)
    p.log.log_event(
        from_step,
        "rollback",
        to_step=s.step,
        checkpoint=target.name,
        skipped_batches=(from_step - s.step) * p.accum,
    )
    bar.note(
        f"step {from_step}: loss blew up; rolled back to {target.name}, skipping the batches since"
    )
    p.optimizer.zero_grad(set_to_none=True)
    s.window = MetricWindow()
    return True


def _rollback_target(run: RunDir, bad_since: int | None) -> Path | None:
    """Newest intact checkpoint written before the blow-up began."""
    for path in reversed(list_checkpoints(run.checkpoints)):
        step = checkpoint_step(path.name)
        if (bad_since is None or step < bad_since) and ckpt.problem(path) is None:
            return path
    return None


def _optimizer_step(p: _Parts, decision: Decision) -> float:
    """Apply the update (unless the guard said skip) and advance the schedule; returns the
    learning rate the update used."""
    if decision.action == "skip_step":
        p.optimizer.zero_grad(set_to_none=True)  # drop this update, keep the weights
    elif p.scaler:
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        p.optimizer.step()
    lr = p.scheduler.get_last_lr()[0]
    p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=True)
    return lr


# ------------------------------------------------------------------------ periodic records
def _log(
    p: _Parts,
    s: TrainState,
    step: Step,
    lr: float,
    before: list[torch.Tensor] | None,
    bar: TrainProgress,
) -> None:
    """A metrics record over the window since the last one (when `before`, the weights before
    this update, was taken: a logged step); otherwise only the progress bar moves."""
    if before is None:
        bar.update(s.step, loss=step.loss)
        return
    win = s.window
    tps = win.tokens / win.time
    p.log.log_metrics(
        s.step,
        tokens=s.tokens,
        **{"train/loss": win.loss / win.steps},
        **win.task_means(),
        lr=lr,
        grad_norm=step.grad_norm,
        clipped=win.clipped / win.steps,
        tokens_per_s=tps,
        step_time=win.time / win.steps,
        step_time_p50=win.percentile(0.5),
        step_time_p90=win.percentile(0.9),
        step_time_max=max(win.step_times),
        update_ratio=update_ratio(before, p.trainable, p.env, p.device),
        data_share=win.data / win.time,
        mfu=p.flops_per_token * tps / p.peak if p.peak else None,
        mem_mb=memory_mb(p.device),
    )
    for det in p.guard.observe_throughput(s.step, tps).detections:
        p.log.log_event(det.step, "anomaly", **det.event())
    bar.update(s.step, loss=win.loss / win.steps, tokens_per_s=tps)
    s.window = MetricWindow()


def _evaluate(
    p: _Parts, s: TrainState, result: TrainResult, bar: TrainProgress, is_last: bool
) -> dict:
    """Validation when due (every eval_every steps and at the end) and the early-stop check;
    returns this step's metrics ({} when none were computed here)."""
    if not (s.step % p.cfg.tracking.eval_every == 0 or is_last):
        return {}
    val = p.task.evaluate(p.evaluator, p.env, p.device)
    if not val:
        return {}
    p.log.log_metrics(s.step, tokens=s.tokens, **val)
    p.log.log_event(s.step, "eval", **val)
    bar.note(f"step {s.step}: {val_summary(val)}")
    es = p.cfg.optim.early_stop
    if val["val/loss"] < s.best_val - es.min_delta:
        s.best_val, s.bad_evals = val["val/loss"], 0
    else:
        s.bad_evals += 1
    result.val, result.best_val_loss = val, s.best_val
    if es.patience is not None and s.bad_evals >= es.patience:
        p.log.log_event(s.step, "early_stop", patience=es.patience, best_val_loss=s.best_val)
        result.stopped_early = True
    return val


def _score_tasks(p: _Parts, s: TrainState, bar: TrainProgress, is_last: bool) -> None:
    """The score hook (task evaluation) on rank 0, when it says it is due."""
    score = p.hooks.score
    if not (score and p.env.is_main and score.due(s.step, is_last)):
        return
    scores = score(p.model)
    p.log.log_metrics(s.step, tokens=s.tokens, **scores)
    p.log.log_event(s.step, "task_eval", **scores)
    bar.note(
        f"step {s.step}: "
        + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in scores.items())
    )


def _sample(p: _Parts, step: int, is_last: bool, due: bool = False) -> None:
    """Text from the sample hook. Sharded weights need every rank in each forward; replicas let
    rank 0 sample alone."""
    due = due or step % p.cfg.tracking.sample_every == 0 or is_last
    if not (p.hooks.sample and due and (p.env.is_main or p.placement.sharded)):
        return
    for prompt, text in p.hooks.sample(p.model, step, p.device):
        p.log.log_sample(step, prompt, text)


# --------------------------------------------------------------------------- checkpoints
def _checkpoint(p: _Parts, s: TrainState, val: dict, is_last: bool) -> None:
    """An atomic checkpoint when due, carrying this step's validation metrics (none when this
    step was not evaluated); the best one by validation loss is kept by pruning."""
    if not (s.step % p.cfg.tracking.checkpoint_every == 0 or is_last):
        return
    if val and val["val/loss"] == s.best_val:  # keep-best: this one
        s.best_path = str(step_dir(p.run.checkpoints, s.step))
    train_state = {
        "scheduler": p.scheduler.state_dict(),
        "loader": p.loader.state_dict(),
        "guard": p.guard.state_dict(),
        "counters": s.counters(),
    }
    rank_state = {"mask_generator": p.mask_gen.get_state(), "rng": ckpt.rng_state()}
    meta = {
        "tokens": s.tokens,
        "train_loss": s.last_loss,
        "world_size": p.env.world_size,
        "strategy": p.placement.strategy,
        **val,
    }
    path = ckpt.save_checkpoint(
        p.run.checkpoints,
        s.step,
        p.model,
        train_state,
        meta,
        optimizer=p.optimizer,
        rank_state=rank_state,
        env=p.env,
        consolidate=is_last and p.placement.sharded,
        base=p.task.checkpoint_base(),
    )
    p.log.log_event(s.step, "checkpoint", path=path.name, **val)
    if p.env.is_main:
        best = Path(s.best_path) if s.best_path else None
        ckpt.prune(p.run.checkpoints, p.cfg.tracking.keep_last, best)


def _finish(p: _Parts, s: TrainState, result: TrainResult) -> str:
    """How the call ended: finished (and an end event), halted, or killed (stopped on purpose
    before the end, resumable)."""
    if s.step >= p.steps or result.stopped_early:
        p.log.log_event(
            s.step,
            "end",
            tokens=s.tokens,
            train_loss=result.train_loss,
            best_val_loss=s.best_val,
        )
        return "finished"
    return "halted" if result.halted else "killed"
