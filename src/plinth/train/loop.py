"""The one training loop, for every objective and architecture. Read it top to bottom.

    plinth pretrain configs/quickstart.yaml pretrain.max_steps=50

Per optimizer step: accumulate `accum` micro-batches (loss / accum, backward), clip the
gradient norm (the pre-clip norm is logged), step optimizer and schedule. Every
`tracking.log_every` steps a metrics record; every `eval_every` a validation pass (loss,
perplexity, bits per byte); every `sample_every` text from fixed prompts (decoders); every
`checkpoint_every` an atomic checkpoint. Resume restores weights, optimizer, schedule,
data position and every RNG, so N + N steps equal 2N steps bit for bit on CPU.
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
from plinth.data import PackedLoader
from plinth.distributed.parallelize import parallelize
from plinth.errors import PlinthError
from plinth.models import build_model
from plinth.track.hardware import memory_mb, peak_flops
from plinth.track.run import RunDir
from plinth.train import state as ckpt
from plinth.train.objectives import SpecialTokens, compute_loss
from plinth.train.optim import build_optimizer, build_scheduler


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


def total_steps(cfg: Config, tokens_per_step: int, train_tokens: int) -> int:
    """The first bound reached among max_steps, max_tokens and max_epochs."""
    p = cfg.pretrain
    bounds = []
    if p.max_steps is not None:
        bounds.append(p.max_steps)
    if p.max_tokens is not None:
        bounds.append(math.ceil(p.max_tokens / tokens_per_step))
    if p.max_epochs is not None:
        bounds.append(math.ceil(p.max_epochs * train_tokens / tokens_per_step))
    return max(1, min(bounds))


def special_tokens(ds) -> SpecialTokens:
    return SpecialTokens(
        eos_id=ds.eos_id,
        pad_id=ds.pad_id,
        mask_id=ds.mask_id,
        bos_id=ds.bos_id,
        sentinel_ids=list(getattr(ds, "sentinel_ids", [])),
    )


@torch.no_grad()
def evaluate(
    model, ds, cfg: Config, device, special: SpecialTokens, bytes_per_token: float
) -> dict:
    """Validation loss, perplexity and (for causal LMs) bits per byte on a fixed set of batches
    ({} when there is no validation split, e.g. data.val_fraction=0)."""
    if ds.num_docs("val") == 0:
        return {}
    was_training = model.training
    model.eval()
    loader = PackedLoader(
        ds,
        split="val",
        seq_len=cfg.model.max_seq_len,
        batch_size=cfg.optim.micro_batch,
        seed=cfg.seed,
        shuffle=False,
        loop=False,
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # same masks at every evaluation
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= cfg.tracking.eval_batches:
            break
        with autocast_context(cfg, device):
            out = compute_loss(
                cfg.objective,
                model,
                batch.to(device),
                special,
                mask_ratio=cfg.pretrain.mask_ratio,
                mean_span_length=cfg.pretrain.mean_span_length,
                generator=gen,
            )
        total += out.ce.item() * out.n_tokens
        count += out.n_tokens
    model.train(was_training)
    if count == 0:
        return {}
    loss = total / count
    metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/tokens": count}
    if cfg.objective == "clm" and bytes_per_token > 0:
        metrics["val/bpb"] = loss / math.log(2) / bytes_per_token
    return metrics


def sample_texts(model, ds, cfg: Config, device, step: int) -> list[tuple[str, str]]:
    """Continuations of the fixed prompts, drawn from a generator seeded by step (so sampling
    never disturbs the training RNG)."""
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


def update_ratio(before: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    """||update|| / ||weights|| over all trainable weights: ~1e-3 is healthy for Adam; much
    larger means the learning rate is too high, much smaller that layers barely move."""
    delta = torch.stack([(p.detach() - b).norm() for p, b in zip(params, before, strict=True)])
    weight = torch.stack([b.norm() for b in before])
    return (delta.norm() / weight.norm().clamp_min(1e-12)).item()


FaultHook = Callable[[int, torch.Tensor], torch.Tensor]
"""fault_hook(micro_batch_index, loss) -> loss: chaos testing of the stability guard. The index
counts micro-batches drawn from the loader, so a poisoned batch stays poisoned data: after a
rollback the loader has moved past it, exactly as with a real bad batch."""


def train(
    cfg: Config,
    ds,
    run: RunDir,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    fault_hook: FaultHook | None = None,
) -> TrainResult:
    """Train `cfg.model` on the prepared dataset `ds`, writing everything into `run`.

    `stop_after` ends this call after that many optimizer steps (tests use it to simulate an
    interruption); the run is then resumable like a killed one.
    """
    from plinth.track.progress import TrainProgress
    from plinth.track.sampler import ResourceSampler
    from plinth.track.sinks import MetricLogger, open_sinks
    from plinth.train.stability import StabilityGuard

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg)
    if ds.vocab_size > cfg.model.vocab_size:
        raise PlinthError(
            f"the tokenizer in {ds.path} has {ds.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}: token ids would fall outside the embedding. Set "
            f"model.vocab_size={ds.vocab_size} (or larger), or prepare data with a smaller vocab."
        )
    model = build_model(cfg.model).to(device)
    net = parallelize(model, cfg)  # what forward/backward run through; `model` is what we save
    special = special_tokens(ds)
    seq_len, micro = cfg.model.max_seq_len, cfg.optim.micro_batch
    try:
        accum = cfg.optim.accum_steps(seq_len)
    except ValueError as e:
        raise PlinthError(f"{e}") from None
    tokens_per_step = accum * micro * seq_len
    train_tokens = ds.num_tokens("train")
    loader = PackedLoader(
        ds,
        split="train",
        seq_len=seq_len,
        batch_size=micro,
        seed=cfg.seed,
        packing=cfg.data.packing,
    )
    if len(loader) == 0:  # rows counted as the loader packs them (separators included)
        raise PlinthError(
            f"the training split of {ds.path} has {train_tokens} tokens, fewer than one "
            f"micro-batch needs ({micro} x {seq_len + 1}). Add data (raise data.max_docs or add "
            "sources) or lower optim.micro_batch / model.max_seq_len."
        )
    steps = total_steps(cfg, tokens_per_step, train_tokens)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    mask_gen = torch.Generator().manual_seed(cfg.seed + 2)
    guard = StabilityGuard(cfg.stability)
    log = MetricLogger(
        run,
        open_sinks(cfg.tracking.sinks, run.path, config=cfg.model_dump(), run_name=run.path.name),
    )
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
        ckpt.load_weights(model, loaded.weights)
        st = loaded.train_state
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        guard.load_state_dict(st["guard"])
        micro = c["micro"]
        c.update(st["counters"])
        if not with_data:
            c["micro"] = micro  # a rollback leaves the data where it is: bad batches stay skipped
        if with_data:
            loader.load_state_dict(st["loader"])
            mask_gen.set_state(st["mask_generator"])
            ckpt.set_rng_state(st["rng"])

    def save(step_now: int, val: dict) -> Path:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "mask_generator": mask_gen.get_state(),
            "rng": ckpt.rng_state(),
            "guard": guard.state_dict(),
            "counters": dict(c),
        }
        meta = {"tokens": c["tokens"], **val}
        path = ckpt.save_checkpoint(run.checkpoints, step_now, model, train_state, meta)
        log.log_event(step_now, "checkpoint", path=path.name, **val)
        ckpt.prune(
            run.checkpoints,
            cfg.tracking.keep_last,
            Path(c["best_path"]) if c["best_path"] else None,
        )
        return path

    if resume:
        loaded = ckpt.load_latest(run.checkpoints)
        for path, why in loaded.skipped:
            log.log_event(c["step"], "checkpoint_skipped", path=path.name, reason=why)
            print(f"warning: skipping checkpoint {path.name} ({why}); using {loaded.path.name}")
        restore(loaded, with_data=True)
        log.log_event(c["step"], "resume", checkpoint=loaded.path.name, tokens=c["tokens"])

    flops_per_token = model.flops_per_token(seq_len)
    peak = peak_flops(device)
    bpt = ds.bytes_per_token("val")
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
    )
    sampler = ResourceSampler(run.path / "system.jsonl", interval=10.0).start()
    status = "failed"
    win, last_val, steps_this_call = _Window(), {}, 0
    try:
        with TrainProgress(total=steps, start=c["step"], enabled=progress) as bar:
            while c["step"] < steps:
                t0 = time.perf_counter()
                data_time, step_loss = 0.0, 0.0
                for _ in range(accum):
                    td = time.perf_counter()
                    batch = next(data_iter).to(device, non_blocking=True)
                    data_time += time.perf_counter() - td
                    with amp:
                        out = compute_loss(
                            cfg.objective,
                            net,
                            batch,
                            special,
                            mask_ratio=cfg.pretrain.mask_ratio,
                            mean_span_length=cfg.pretrain.mean_span_length,
                            z_loss=cfg.optim.z_loss,
                            generator=mask_gen,
                        )
                    loss_value = (
                        out.loss if fault_hook is None else fault_hook(c["micro"], out.loss)
                    )
                    c["micro"] += 1
                    loss = loss_value / accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += (
                        out.ce.item() if fault_hook is None else loss_value.item()
                    ) / accum
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
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
                    target = _rollback_target(run, decision.bad_since)
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
                    restore(ckpt.load_checkpoint(target), with_data=False)
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
                before = [p.detach().clone() for p in trainable] if log_now else None
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
                c["tokens"] += tokens_per_step
                step, steps_this_call = c["step"], steps_this_call + 1
                win.loss += step_loss
                win.steps += 1
                win.tokens += tokens_per_step
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
                        update_ratio=update_ratio(before, trainable),
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
                    last_val = evaluate(net, ds, cfg, device, special, bpt)
                    if last_val:
                        log.log_metrics(step, tokens=c["tokens"], **last_val)
                        log.log_event(step, "eval", **last_val)
                        bpb = last_val.get("val/bpb")
                        bar.note(
                            f"step {step}: val loss {last_val['val/loss']:.3f}"
                            + (f", {bpb:.3f} bits/byte" if bpb is not None else "")
                        )
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
                if cfg.model.arch == "decoder" and (
                    step % cfg.tracking.sample_every == 0 or is_last
                ):
                    for prompt, text in sample_texts(model, ds, cfg, device, step):
                        log.log_sample(step, prompt, text)
                if step % cfg.tracking.checkpoint_every == 0 or is_last:
                    if last_val and last_val["val/loss"] == c["best_val"]:  # keep-best: this one
                        c["best_path"] = str(ckpt.step_dir(run.checkpoints, step))
                    save(step, last_val)
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
    finally:
        sampler.stop()
        log.close("finished" if status in ("finished", "killed") else "failed")
    return result


def _rollback_target(run: RunDir, bad_since: int | None) -> Path | None:
    """Newest intact checkpoint written before the blow-up began."""
    for path in reversed(ckpt.list_checkpoints(run.checkpoints)):
        step = int(path.name.split("_")[1])
        if (bad_since is None or step < bad_since) and ckpt.verify(path) is None:
            return path
    return None
