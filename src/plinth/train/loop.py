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
    """Validation loss, perplexity and (for causal LMs) bits per byte on a fixed set of batches."""
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


def train(
    cfg: Config,
    ds,
    run: RunDir,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `cfg.model` on the prepared dataset `ds`, writing everything into `run`.

    `stop_after` ends the loop after that many optimizer steps of *this* invocation without
    the end-of-run evaluation (used by tests to simulate an interruption).
    """
    from plinth.track.progress import TrainProgress

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
    if train_tokens < (seq_len + 1) * micro:
        raise PlinthError(
            f"the training split of {ds.path} has {train_tokens} tokens, fewer than one "
            f"micro-batch needs ({micro} x {seq_len + 1}). Add data (raise data.max_docs or add "
            "sources) or lower optim.micro_batch / model.max_seq_len."
        )
    steps = total_steps(cfg, tokens_per_step, train_tokens)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    loader = PackedLoader(
        ds,
        split="train",
        seq_len=seq_len,
        batch_size=micro,
        seed=cfg.seed,
        packing=cfg.data.packing,
    )
    mask_gen = torch.Generator().manual_seed(cfg.seed + 2)
    step, tokens, best_val, bad_evals = 0, 0, math.inf, 0
    best_path: Path | None = None

    if resume:
        loaded = ckpt.load_latest(run.checkpoints)
        for path, why in loaded.skipped:
            run.log_event(step, "checkpoint_skipped", path=path.name, reason=why)
            print(f"warning: skipping checkpoint {path.name} ({why}); using {loaded.path.name}")
        ckpt.load_weights(model, loaded.weights)
        st = loaded.train_state
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        loader.load_state_dict(st["loader"])
        mask_gen.set_state(st["mask_generator"])
        ckpt.set_rng_state(st["rng"])
        step, tokens = st["step"], st["tokens"]
        best_val, bad_evals = st["best_val"], st["bad_evals"]
        best_path = Path(st["best_path"]) if st.get("best_path") else None
        run.log_event(step, "resume", checkpoint=loaded.path.name, tokens=tokens)

    flops_per_token = model.flops_per_token(seq_len)
    peak = peak_flops(device)
    bpt = ds.bytes_per_token("val")
    amp = autocast_context(cfg, device)
    scaler = (
        torch.amp.GradScaler(device.type)
        if (cfg.hardware.precision == "fp16" and device.type == "cuda")
        else None
    )
    model.train()
    data_iter = iter(loader)
    result = TrainResult(
        step=step, tokens=tokens, train_loss=math.nan, best_val_loss=best_val, run_dir=run.path
    )
    run.log_event(
        step,
        "start",
        total_steps=steps,
        accum=accum,
        tokens_per_step=tokens_per_step,
        params=model.num_params(),
        device=str(device),
    )

    def save(step_now: int, val: dict) -> Path:
        train_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "mask_generator": mask_gen.get_state(),
            "rng": ckpt.rng_state(),
            "step": step_now,
            "tokens": tokens,
            "best_val": best_val,
            "bad_evals": bad_evals,
            "best_path": str(best_path) if best_path else None,
        }
        path = ckpt.save_checkpoint(
            run.checkpoints, step_now, model, train_state, {"tokens": tokens, **val}
        )
        run.log_event(step_now, "checkpoint", path=path.name, **val)
        ckpt.prune(run.checkpoints, cfg.tracking.keep_last, best_path)
        return path

    window_loss, window_steps, window_tokens, window_time, window_data = 0.0, 0, 0, 0.0, 0.0
    last_val: dict = {}
    steps_this_call = 0
    with TrainProgress(total=steps, start=step, enabled=progress) as bar:
        while step < steps:
            t0 = time.perf_counter()
            data_time = 0.0
            step_loss = 0.0
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
                loss = out.loss / accum
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += out.ce.item() / accum
            if scaler:
                scaler.unscale_(optimizer)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_call += 1
            tokens += tokens_per_step
            dt = time.perf_counter() - t0
            window_loss += step_loss
            window_steps += 1
            window_tokens += tokens_per_step
            window_time += dt
            window_data += data_time
            result.train_loss = step_loss

            if step % cfg.tracking.log_every == 0 or step == steps:
                tps = window_tokens / window_time
                run.log_metrics(
                    step,
                    tokens=tokens,
                    **{"train/loss": window_loss / window_steps},
                    lr=lr,
                    grad_norm=grad_norm,
                    clipped=grad_norm > clip,
                    tokens_per_s=tps,
                    step_time=window_time / window_steps,
                    data_share=window_data / window_time,
                    mfu=flops_per_token * tps / peak if peak else None,
                    mem_mb=memory_mb(device),
                )
                bar.update(step, loss=window_loss / window_steps, tokens_per_s=tps)
                window_loss, window_steps, window_tokens, window_time, window_data = (
                    0.0,
                    0,
                    0,
                    0.0,
                    0.0,
                )
            else:
                bar.update(step, loss=step_loss)

            is_last = step == steps
            improved = False
            if step % cfg.tracking.eval_every == 0 or is_last:
                last_val = evaluate(net, ds, cfg, device, special, bpt)
                if last_val:
                    run.log_metrics(step, tokens=tokens, **last_val)
                    run.log_event(step, "eval", **last_val)
                    bpb = last_val.get("val/bpb")
                    bar.note(
                        f"step {step}: val loss {last_val['val/loss']:.3f}"
                        + (f", {bpb:.3f} bits/byte" if bpb is not None else "")
                    )
                    improved = last_val["val/loss"] < best_val - cfg.optim.early_stop.min_delta
                    best_val, bad_evals = (
                        (last_val["val/loss"], 0) if improved else (best_val, bad_evals + 1)
                    )
                    result.val, result.best_val_loss = last_val, best_val
                    patience = cfg.optim.early_stop.patience
                    if patience is not None and bad_evals >= patience:
                        run.log_event(step, "early_stop", patience=patience, best_val_loss=best_val)
                        result.stopped_early = is_last = True
            if cfg.model.arch == "decoder" and (step % cfg.tracking.sample_every == 0 or is_last):
                for prompt, text in sample_texts(model, ds, cfg, device, step):
                    run.log_sample(step, prompt, text)
            if step % cfg.tracking.checkpoint_every == 0 or is_last:
                if last_val and last_val["val/loss"] == best_val:  # keep-best: this one
                    best_path = ckpt.step_dir(run.checkpoints, step)
                save(step, last_val)
            if is_last or (stop_after is not None and steps_this_call >= stop_after):
                break

    result.step, result.tokens = step, tokens
    if step >= steps or result.stopped_early:
        run.log_event(
            step, "end", tokens=tokens, train_loss=result.train_loss, best_val_loss=best_val
        )
    return result
