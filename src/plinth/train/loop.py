"""The one training loop, for every objective and architecture. Read it top to bottom.

    plinth pretrain configs/quickstart.yaml pretrain.max_steps=50

Per optimizer step: accumulate `accum` micro-batches (loss / accum, backward), clip the
gradient norm (the pre-clip norm is logged), step optimizer and schedule. Every
`tracking.log_every` steps a metrics record; every `eval_every` a validation pass (loss,
perplexity, bits per byte); every `sample_every` text from fixed prompts (decoders); every
`checkpoint_every` an atomic checkpoint. Resume restores weights, optimizer, schedule,
data position and every RNG, so N + N steps equal 2N steps bit for bit on CPU.

What is trained comes from a `Task` (plinth.train.task): pretraining (`PretrainTask`) and
fine-tuning (`plinth.finetune.FinetuneTask`) give it the model, batches, loss, validation and
samples, and share everything else here.

Under torchrun every rank runs this same loop on its own slice of each global batch
(`distributed.strategy` ddp/fsdp/hsdp, see plinth.distributed); the step loss, validation
loss and norms are reduced over ranks, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plinth.config.schema import Config
from plinth.distributed.env import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    check_strategy,
    device_for,
    init_process_group,
)
from plinth.distributed.parallelize import parallelize
from plinth.errors import PlinthError
from plinth.track.hardware import memory_mb, peak_flops
from plinth.track.run import RunDir
from plinth.train import state as ckpt
from plinth.train.optim import build_optimizer, build_scheduler
from plinth.train.task import (  # noqa: F401  (evaluate, sample_texts: public here too)
    PretrainTask,
    Task,
    evaluate,
    sample_texts,
    special_tokens,
)


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


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.hardware.device
    if want == "cuda" and not torch.cuda.is_available():
        raise PlinthError(
            "hardware.device=cuda but no CUDA device is visible (torch.cuda.is_available() is "
            "False). Set hardware.device=auto to train on the CPU, or install a CUDA build of "
            "torch."
        )
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def autocast_context(cfg: Config, device: torch.device):
    """bf16/fp16 autocast where it helps; fp32 (no context) otherwise, see config checks."""
    precision = cfg.hardware.precision
    if precision == "fp32" or (precision == "fp16" and device.type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class _Window:
    """Accumulates steps between two metric records."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    time: float = 0.0
    data: float = 0.0
    clipped: int = 0
    step_times: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.step_times)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (the tensor itself when not sharded)."""
    return t.to_local() if hasattr(t, "to_local") else t


def update_ratio(
    before: list[torch.Tensor],
    params: list[torch.Tensor],
    env: DistEnv | None = None,
    device: torch.device | None = None,
) -> float:
    """||update|| / ||weights|| over all trainable weights: ~1e-3 is healthy for Adam; much
    larger means the learning rate is too high, much smaller that layers barely move.
    `before` holds local tensors; sharded sums are reduced over ranks (replicas count every
    element equally often, which leaves the ratio unchanged)."""
    delta = sum(
        (_local(p.detach()).float() - b.float()).square().sum()
        for p, b in zip(params, before, strict=True)
    )
    weight = sum(b.float().square().sum() for b in before)
    sums = [float(delta), float(weight)]
    if env is not None and any(hasattr(p, "to_local") for p in params):
        sums = all_reduce_sum(sums, env, device)
    return math.sqrt(sums[0]) / max(math.sqrt(sums[1]), 1e-12)


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


RANK_SEED = 1_000_003  # rank r > 0 draws dropout/masks from seed + r * RANK_SEED


def grad_sync(net, strategy: str, sync: bool):
    """Skip needless gradient all-reduces on all but the last micro-batch of a step: DDP's
    no_sync, and HSDP's all-reduce across replicas (FSDP still reduce-scatters every
    micro-batch, otherwise each rank would hold unsharded gradients)."""
    if strategy == "ddp" and not sync:
        return net.no_sync()
    if strategy == "hsdp":
        net.set_requires_all_reduce(sync)
    return contextlib.nullcontext()


def _collective_failure(e: BaseException, env: DistEnv, step: int, timeout: int) -> PlinthError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return PlinthError(
        f"rank {env.rank} of {env.world_size} lost contact with the other ranks at step "
        f"{step + 1} ({first}). Another rank most likely failed: its own output (torchrun "
        "prints each rank's error) says why. Collectives give up after distributed.timeout_s="
        f"{timeout} s rather than hang; resume the run with --resume once the cause is fixed."
    )


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection closed", "timed out", "connection reset")
    )


FaultHook = Callable[[int, torch.Tensor], torch.Tensor]
"""fault_hook(micro_batch_index, loss) -> loss: chaos testing of the stability guard. The index
counts micro-batches drawn from the loader, so a poisoned batch stays poisoned data: after a
rollback the loader has moved past it, exactly as with a real bad batch."""


def train(
    cfg: Config,
    data,
    run: RunDir,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    fault_hook: FaultHook | None = None,
    env: DistEnv | None = None,
) -> TrainResult:
    """Train on `data` (a `Task`, or a prepared dataset: pretraining), writing everything into
    `run`.

    `stop_after` ends this call after that many optimizer steps (tests use it to simulate an
    interruption); the run is then resumable like a killed one. Under torchrun every rank
    calls it with its `env`; `run` is the same directory on all (only rank 0 writes to it).
    """
    from plinth.track.progress import TrainProgress
    from plinth.track.sampler import ResourceSampler
    from plinth.track.sinks import MetricLogger, open_sinks
    from plinth.train.stability import StabilityGuard

    env = env or DistEnv()
    task: Task = data if isinstance(data, Task) else PretrainTask(cfg, data)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    device = device_for(cfg, env, resolve_device(cfg))
    strategy = check_strategy(cfg, env, device)
    init_process_group(cfg, env, device)
    model = task.build_model(device)
    if env.rank:
        torch.manual_seed(cfg.seed + RANK_SEED * env.rank)  # own dropout; rank 0 = 1 process
    # what forward/backward run through; `model` is what we save (the FSDP root when sharded)
    net = parallelize(model, cfg, env, device, strategy)
    seq_len, micro = task.seq_len, cfg.optim.micro_batch
    try:
        accum = cfg.optim.accum_steps(seq_len, env.world_size)
    except ValueError as e:
        raise PlinthError(f"{e}") from None
    tokens_per_step = accum * micro * seq_len * env.world_size  # rows x row length
    loader = task.loader(env)
    steps = task.total_steps(tokens_per_step, accum * env.world_size)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 2 + RANK_SEED * env.rank)
    guard = StabilityGuard(cfg.stability)
    sharded = strategy in ("fsdp", "hsdp")
    if env.is_main:
        sinks = open_sinks(
            cfg.tracking.sinks, run.path, config=cfg.model_dump(), run_name=run.path.name
        )
        log = MetricLogger(run, sinks)
    else:
        log = _NullLogger()
    c = {
        "step": 0,
        "tokens": 0,
        "best_val": math.inf,
        "bad_evals": 0,
        "best_path": None,
        "micro": 0,
    }  # counters that checkpoints carry

    def restore(loaded, with_data: bool) -> None:
        """Weights, optimizer, schedule, counters (and, on resume, data position and RNG)."""
        loaded.load_into(model, optimizer)
        st = loaded.train_state
        scheduler.load_state_dict(st["scheduler"])
        guard.load_state_dict(st["guard"])
        micro = c["micro"]
        c.update(st["counters"])
        if not with_data:
            c["micro"] = micro  # a rollback leaves the data where it is: bad batches stay skipped
        if with_data:
            loader.load_state_dict(st["loader"])  # global position: any world size
            mine = loaded.rank_state(env)
            if mine is not None:
                mask_gen.set_state(mine["mask_generator"])
                ckpt.set_rng_state(mine["rng"])
            else:  # another world size: fresh, deterministic random streams for this rank
                torch.manual_seed(cfg.seed + RANK_SEED * env.rank + c["step"])
                mask_gen.manual_seed(cfg.seed + 2 + RANK_SEED * env.rank + c["step"])
                if env.is_main:
                    print(
                        f"note: {loaded.path.name} was written by "
                        f"{st.get('world_size', 1)} process(es), this job has "
                        f"{env.world_size}: data continues exactly, dropout/masking "
                        "randomness restarts from the seed"
                    )

    def save(step_now: int, val: dict, final: bool = False) -> Path:
        train_state = {
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "guard": guard.state_dict(),
            "counters": dict(c),
        }
        rank_state = {"mask_generator": mask_gen.get_state(), "rng": ckpt.rng_state()}
        meta = {"tokens": c["tokens"], "world_size": env.world_size, "strategy": strategy, **val}
        path = ckpt.save_checkpoint(
            run.checkpoints,
            step_now,
            model,
            train_state,
            meta,
            optimizer=optimizer,
            rank_state=rank_state,
            env=env,
            consolidate=final and sharded,
        )
        log.log_event(step_now, "checkpoint", path=path.name, **val)
        if env.is_main:
            ckpt.prune(
                run.checkpoints,
                cfg.tracking.keep_last,
                Path(c["best_path"]) if c["best_path"] else None,
            )
        return path

    if resume:
        # rank 0 checks the checksums and picks; the others load what it picked
        picked = None
        if env.is_main:
            try:
                latest = ckpt.load_latest(run.checkpoints)
                picked = (str(latest.path), [(str(p), w) for p, w in latest.skipped])
            except PlinthError as e:
                picked = e
        picked = broadcast_object(picked, env)
        if isinstance(picked, PlinthError):
            raise picked
        loaded = ckpt.load_checkpoint(
            Path(picked[0]), [(Path(p), w) for p, w in picked[1]], check=False
        )
        for path, why in loaded.skipped:
            log.log_event(c["step"], "checkpoint_skipped", path=path.name, reason=why)
            if env.is_main:
                print(
                    f"warning: skipping checkpoint {path.name} ({why}); using {loaded.path.name}"
                )
        restore(loaded, with_data=True)
        log.log_event(c["step"], "resume", checkpoint=loaded.path.name, tokens=c["tokens"])

    task_scorer = TaskScorer.create(cfg, task, sharded)  # checks task files before training
    flops_per_token = task.flops_per_token(model)
    peak = peak_flops(device) * env.world_size
    amp = autocast_context(cfg, device)
    fp16 = cfg.hardware.precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    data_iter = iter(loader)
    result = TrainResult(
        step=c["step"],
        tokens=c["tokens"],
        train_loss=math.nan,
        best_val_loss=c["best_val"],
        run_dir=run.path,
    )
    log.log_event(
        c["step"],
        "start",
        total_steps=steps,
        accum=accum,
        tokens_per_step=tokens_per_step,
        params=model.num_params(),
        device=str(device),
        world_size=env.world_size,
        strategy=strategy,
    )
    sampler = ResourceSampler(run.path / "system.jsonl", interval=10.0) if env.is_main else None
    if sampler:
        sampler.start()
    status = "failed"
    win, last_val, steps_this_call = _Window(), {}, 0
    try:
        with TrainProgress(total=steps, start=c["step"], enabled=progress and env.is_main) as bar:
            if task.baseline and c["step"] == 0:  # where a fine-tune starts from, to compare
                base_val = task.evaluate(model if strategy == "ddp" else net, env, device)
                if base_val:
                    log.log_metrics(0, tokens=0, **base_val)
                    log.log_event(0, "eval", **base_val)
                    bar.note(f"step 0 (the base model): {val_summary(base_val)}")
                if env.is_main or sharded:
                    for prompt, text in task.samples(model, 0, device):
                        log.log_sample(0, prompt, text)
            while c["step"] < steps:
                t0 = time.perf_counter()
                data_time, step_loss, step_tokens = 0.0, 0.0, 0
                for i in range(accum):
                    td = time.perf_counter()
                    batch = next(data_iter).to(device, non_blocking=True)
                    data_time += time.perf_counter() - td
                    step_tokens += task.batch_tokens(batch)
                    with grad_sync(net, strategy, sync=i == accum - 1):
                        with amp:
                            out = task.loss(net, batch, mask_gen)
                        loss_value = (
                            out.loss if fault_hook is None else fault_hook(c["micro"], out.loss)
                        )
                        c["micro"] += 1
                        loss = loss_value / accum
                        (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += (
                        out.ce.item() if fault_hook is None else loss_value.item()
                    ) / accum
                if env.distributed:  # the global batch's loss: same guard decision everywhere
                    step_loss, step_tokens = all_reduce_sum([step_loss, step_tokens], env, device)
                    step_loss, step_tokens = step_loss / env.world_size, int(step_tokens)
                if scaler:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
                # fp16 overflow is the loss scaler's business (it skips the step itself)
                observed_norm = None if (fp16 and not math.isfinite(grad_norm)) else grad_norm
                decision = guard.observe(c["step"] + 1, step_loss, observed_norm)
                for det in decision.detections:
                    log.log_event(det.step, "anomaly", **det.event())
                if decision.action == "halt":
                    status = "halted"
                    bar.note(
                        f"step {c['step'] + 1}: halted by the stability guard "
                        f"({', '.join(d.kind for d in decision.detections)})"
                    )
                    result.halted = True
                    break
                if decision.action == "rollback":
                    # rank 0 checks checksums; everyone rolls back to the same checkpoint
                    target = broadcast_object(
                        _rollback_target(run, decision.bad_since) if env.is_main else None, env
                    )
                    if target is None:
                        log.log_event(
                            c["step"] + 1,
                            "anomaly",
                            type="blowup",
                            action="halt",
                            reason="no checkpoint older than the blow-up",
                        )
                        result.halted, status = True, "halted"
                        break
                    from_step = c["step"] + 1
                    restore(ckpt.load_checkpoint(target, check=False), with_data=False)
                    guard.rolled_back(c["step"])
                    log.log_event(
                        from_step,
                        "rollback",
                        to_step=c["step"],
                        checkpoint=target.name,
                        skipped_batches=(from_step - c["step"]) * accum,
                    )
                    bar.note(
                        f"step {from_step}: loss blew up; rolled back to {target.name}, "
                        "skipping the batches since"
                    )
                    optimizer.zero_grad(set_to_none=True)
                    win = _Window()
                    continue
                # one weight snapshot per logged step measures the update-to-weight ratio
                log_now = (c["step"] + 1) % cfg.tracking.log_every == 0 or c["step"] + 1 == steps
                before = [_local(p.detach()).clone() for p in trainable] if log_now else None
                if decision.action == "skip_step":
                    optimizer.zero_grad(set_to_none=True)  # drop this update, keep the weights
                elif scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                c["step"] += 1
                c["tokens"] += step_tokens
                step, steps_this_call = c["step"], steps_this_call + 1
                win.loss += step_loss
                win.steps += 1
                win.tokens += step_tokens
                win.time += time.perf_counter() - t0
                win.step_times.append(time.perf_counter() - t0)
                win.data += data_time
                win.clipped += grad_norm > clip
                result.train_loss = step_loss

                if log_now:
                    tps = win.tokens / win.time
                    log.log_metrics(
                        step,
                        tokens=c["tokens"],
                        **{"train/loss": win.loss / win.steps},
                        lr=lr,
                        grad_norm=grad_norm,
                        clipped=win.clipped / win.steps,
                        tokens_per_s=tps,
                        step_time=win.time / win.steps,
                        step_time_p50=win.percentile(0.5),
                        step_time_p90=win.percentile(0.9),
                        step_time_max=max(win.step_times),
                        update_ratio=update_ratio(before, trainable, env, device),
                        data_share=win.data / win.time,
                        mfu=flops_per_token * tps / peak if peak else None,
                        mem_mb=memory_mb(device),
                    )
                    for det in guard.observe_throughput(step, tps).detections:
                        log.log_event(det.step, "anomaly", **det.event())
                    bar.update(step, loss=win.loss / win.steps, tokens_per_s=tps)
                    win = _Window()
                else:
                    bar.update(step, loss=step_loss)

                is_last = step == steps
                if step % cfg.tracking.eval_every == 0 or is_last:
                    # replicas evaluate the bare model: DDP's forward would sync buffers
                    evaluator = model if strategy == "ddp" else net
                    last_val = task.evaluate(evaluator, env, device)
                    if last_val:
                        log.log_metrics(step, tokens=c["tokens"], **last_val)
                        log.log_event(step, "eval", **last_val)
                        bar.note(f"step {step}: {val_summary(last_val)}")
                        es = cfg.optim.early_stop
                        if last_val["val/loss"] < c["best_val"] - es.min_delta:
                            c["best_val"], c["bad_evals"] = last_val["val/loss"], 0
                        else:
                            c["bad_evals"] += 1
                        result.val, result.best_val_loss = last_val, c["best_val"]
                        if es.patience is not None and c["bad_evals"] >= es.patience:
                            log.log_event(
                                step,
                                "early_stop",
                                patience=es.patience,
                                best_val_loss=c["best_val"],
                            )
                            result.stopped_early = is_last = True
                if task_scorer and env.is_main and task_scorer.due(step, is_last):
                    scores = task_scorer(model)
                    log.log_metrics(step, tokens=c["tokens"], **scores)
                    log.log_event(step, "task_eval", **scores)
                    bar.note(f"step {step}: " + ", ".join(
                        f"{k.removeprefix('eval/')} {v:.3f}" for k, v in scores.items()))
                # sharded weights need every rank in each forward; replicas let rank 0 alone
                if (step % cfg.tracking.sample_every == 0 or is_last) and (
                    env.is_main or sharded
                ):
                    for prompt, text in task.samples(model, step, device):
                        log.log_sample(step, prompt, text)
                if step % cfg.tracking.checkpoint_every == 0 or is_last:
                    if last_val and last_val["val/loss"] == c["best_val"]:  # keep-best: this one
                        c["best_path"] = str(ckpt.step_dir(run.checkpoints, step))
                    save(step, last_val, final=is_last)
                if is_last or (stop_after is not None and steps_this_call >= stop_after):
                    break
        result.step, result.tokens = c["step"], c["tokens"]
        if c["step"] >= steps or result.stopped_early:
            status = "finished"
            log.log_event(
                c["step"],
                "end",
                tokens=c["tokens"],
                train_loss=result.train_loss,
                best_val_loss=c["best_val"],
            )
        elif not result.halted:
            status = "killed"  # interrupted on purpose (stop_after); resumable
    except Exception as e:
        if env.distributed and _is_collective_failure(e):
            raise _collective_failure(e, env, c["step"], cfg.distributed.timeout_s) from None
        raise
    finally:
        if sampler:
            sampler.stop()
        log.close("finished" if status in ("finished", "killed") else "failed")
    return result


class TaskScorer:
    """Periodic task evaluation (`tracking.eval_tasks`, plinth.eval) on rank 0: the tasks are
    loaded once (bad task files fail before training starts) and scored on the first
    `eval_tasks_limit` examples each time, so the numbers compare across steps."""

    def __init__(self, cfg: Config, tasks, tokenizer, eos_id, max_len: int):
        self.cfg, self.tasks, self.tokenizer = cfg, tasks, tokenizer
        self.eos_id, self.max_len = eos_id, max_len
        t = cfg.tracking
        self.every = t.eval_tasks_every or t.eval_every

    @classmethod
    def create(cls, cfg: Config, task: Task, sharded: bool) -> TaskScorer | None:
        if not cfg.tracking.eval_tasks:
            return None
        if sharded:
            raise PlinthError(
                "tracking.eval_tasks is not supported with distributed.strategy=fsdp/hsdp yet "
                "(rank 0 scores the tasks alone, and sharded weights need every rank). Score "
                "checkpoints afterwards with `plinth eval RUN --tasks ...`, or use ddp."
            )
        io = task.text_io()
        if cfg.model.arch != "decoder" or io is None:
            raise PlinthError(
                f"tracking.eval_tasks={cfg.tracking.eval_tasks} needs a decoder (tasks are "
                f"scored by next-token log-likelihood and generation); this is an "
                f"{cfg.model.arch}. Set tracking.eval_tasks=[] or evaluate a decoder."
            )
        from plinth.eval.tasks import load_tasks

        return cls(cfg, load_tasks(cfg.tracking.eval_tasks), io[0], io[1],
                   cfg.model.max_seq_len)

    def due(self, step: int, is_last: bool) -> bool:
        return step % self.every == 0 or is_last

    def __call__(self, model) -> dict[str, float]:
        from plinth.eval.scoring import task_metrics

        scores = task_metrics(model, self.tokenizer, self.tasks, self.eos_id, self.max_len,
                              limit=self.cfg.tracking.eval_tasks_limit)
        return {f"eval/{k}": float(v) for k, v in scores.items()}


def val_summary(val: dict) -> str:
    """One line of validation results: the loss, and bits/byte, accuracy or F1 when known."""
    parts = [f"val loss {val['val/loss']:.3f}"]
    for key, unit in (("val/bpb", " bits/byte"), ("val/accuracy", " accuracy"), ("val/f1", " F1")):
        if key in val:
            parts.append(f"{val[key]:.3f}{unit}")
    return ", ".join(parts)


def _rollback_target(run: RunDir, bad_since: int | None) -> Path | None:
    """Newest intact checkpoint written before the blow-up began."""
    for path in reversed(ckpt.list_checkpoints(run.checkpoints)):
        step = int(path.name.split("_")[1])
        if (bad_since is None or step < bad_since) and ckpt.verify(path) is None:
            return path
    return None
