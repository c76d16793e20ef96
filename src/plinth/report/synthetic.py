"""Synthetic run directories, written through `RunDir` exactly as a training run lays them out.

    python -m plinth.report.synthetic runs/demo && plinth report runs/demo

Used by the report tests, the browser test and the logging benchmark; handy for trying the
report without training anything. Faults can be injected: non-finite steps, loss spikes, a
crash (optionally with a torn last JSONL line), a resume after the crash, a rollback, a
throughput stall, and a loss offset from some step on (for divergence tests).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from plinth.track.run import RunDir


def write_synthetic_run(
    path: str | Path,
    *,
    steps: int = 600,
    log_every: int = 1,
    seed: int = 0,
    overrides: Iterable[str] = ("optim.lr=0.003", "tracking.log_every=1"),
    nan_steps: Iterable[int] = (),
    spike_steps: Iterable[int] = (),
    eval_every: int = 100,
    checkpoint_every: int = 200,
    crash_at: int | None = None,
    torn_line: bool = False,
    resume: bool = False,
    rollback: tuple[int, int] | None = None,
    stall: tuple[int, int] | None = None,
    offset: tuple[int, float] | None = None,
    noise: float = 0.03,
    end_time: float | None = None,
    step_seconds: float = 0.5,
    tokens_per_step: int = 4096,
    git_sha: str = "0123456789abcdef0123456789abcdef01234567",
    data_fingerprint: str = "sha256:5f1e0c9a2b7d",
    system: bool = True,
) -> Path:
    """Write a run directory; returns its path.

    crash_at: stop at that step without an `end` event (with `resume`, a second segment then
    restarts from the last checkpoint before it, after an hour of downtime). rollback=(a, b):
    at step a the run rolls back to the checkpoint of step b. stall=(a, b): throughput drops
    tenfold between steps a and b. offset=(s, d): the loss is d higher from step s on.
    end_time: wall-clock time of the last record (default: a day ago, so an unfinished run
    reads as crashed; pass time.time() for a run that is still going).
    """
    from plinth.config.load import load_config
    from plinth.config.render import render_yaml

    rng = random.Random(seed)
    nan_steps, spike_steps = set(nan_steps), set(spike_steps)
    path = Path(path)
    run = RunDir(path)
    resolved = load_config([], list(overrides))
    run.write_config(render_yaml(resolved) + "\n")
    cfg = resolved.config
    total = steps

    # the order in which steps are executed, with the downtime before each segment
    segments: list[tuple[list[int], float]] = []
    if crash_at is not None:
        segments.append((list(range(1, crash_at + 1)), 0.0))
        if resume:
            ckpt = (crash_at // checkpoint_every) * checkpoint_every
            segments.append((list(range(ckpt + 1, total + 1)), 3600.0))
    elif rollback is not None:
        at, to = rollback
        segments.append((list(range(1, at + 1)) + list(range(to + 1, total + 1)), 0.0))
    else:
        segments.append((list(range(1, total + 1)), 0.0))
    n_exec = sum(len(s) for s, _ in segments)
    downtime = sum(d for _, d in segments)
    last = end_time if end_time is not None else time.time() - 86400
    t = last - n_exec * step_seconds - downtime - 5.0
    created = t - 30

    run.write_manifest(
        {
            "created": created,
            "git": {"sha": git_sha, "dirty": False, "diff": ""},
            "command": ["plinth", "pretrain", "configs/synthetic.yaml", *overrides],
            "python": sys.version.split()[0],
            "packages": {"plinth": "0.1.0", "torch": "2.13.0"},
            "hardware": {"host": "synthetic", "device": "cpu", "gpu": None, "cpu_count": 2},
            "world_size": 1,
            "seed": seed,
            "data": {"dir": "data/synthetic", "fingerprint": data_fingerprint},
        }
    )

    def event(step: int, kind: str, **details) -> None:
        run.events.write({"step": step, "time": t, "event": kind, **details})

    def loss_at(step: int) -> float:
        base = 2.0 + 6.0 * (1 + step / 60) ** -0.5
        if offset and step >= offset[0]:
            base += offset[1]
        return base * (1 + noise * rng.gauss(0, 1))

    kept: list[int] = []
    ended = True
    for seg_index, (seg_steps, gap) in enumerate(segments):
        t += gap
        event(seg_steps[0] - 1, "start", total_steps=total, params=1_234_567, device="cpu")
        if seg_index:
            event(
                seg_steps[0] - 1,
                "resume",
                checkpoint=f"step_{seg_steps[0] - 1:07d}",
                tokens=(seg_steps[0] - 1) * tokens_per_step,
            )
        prev = seg_steps[0] - 1
        for step in seg_steps:
            if step <= prev:  # a rollback: the guard restored an earlier checkpoint
                event(
                    prev,
                    "anomaly",
                    type="blowup",
                    metric="anomalies",
                    value=4.0,
                    threshold=4.0,
                    window_mean=None,
                    window_std=None,
                    z=None,
                    action="rollback",
                )
                event(
                    prev,
                    "rollback",
                    to_step=step - 1,
                    checkpoint=f"step_{step - 1:07d}",
                    skipped_batches=prev - step + 1,
                )
            prev = step
            t += step_seconds
            lr = (
                cfg.optim.lr
                * min(1.0, step / 50)
                * (0.55 + 0.45 * math.cos(math.pi * step / total))
            )
            loss = loss_at(step)
            grad = 0.4 + 2.0 * math.exp(-step / 80) + 0.05 * abs(rng.gauss(0, 1))
            if step in spike_steps:
                loss += 4.0
                grad *= 12
                event(
                    step,
                    "anomaly",
                    type="spike",
                    metric="loss",
                    value=loss,
                    threshold=loss - 1.0,
                    window_mean=loss - 4.0,
                    window_std=0.1,
                    z=40.0,
                    action="skip_step",
                )
            if step in nan_steps:
                loss, grad = math.nan, math.inf
                event(
                    step,
                    "anomaly",
                    type="nonfinite",
                    metric="loss",
                    value=loss,
                    threshold=None,
                    window_mean=None,
                    window_std=None,
                    z=None,
                    action="skip_step",
                )
            tps = 8192.0 * (1 + 0.02 * rng.gauss(0, 1))
            if stall and stall[0] <= step <= stall[1]:
                tps /= 10
                if step == stall[0]:
                    event(
                        step,
                        "anomaly",
                        type="stall",
                        metric="tokens_per_s",
                        value=tps,
                        threshold=2048.0,
                        window_mean=8192.0,
                        window_std=150.0,
                        z=None,
                        action="log",
                    )
            if step % log_every == 0:
                run.metrics.write(
                    {
                        "step": step,
                        "time": t,
                        "tokens": step * tokens_per_step,
                        "train/loss": loss,
                        "lr": lr,
                        "grad_norm": grad,
                        "clipped": grad > (cfg.optim.grad_clip or math.inf),
                        "tokens_per_s": tps,
                        "step_time": tokens_per_step / tps,
                        "data_share": 0.04 + 0.01 * rng.random(),
                        "mfu": 0.31 * tps / 8192,
                        "mem_mb": 1800.0 + 20 * math.sin(step / 30),
                    }
                )
            if system and step % 10 == 0:
                sample = {
                    "time": t,
                    "cpu_percent": 180 + 10 * rng.random(),
                    "sys_cpu_percent": 92.0,
                    "rss_mb": 950 + step * 0.05,
                    "ram_used_mb": 6000.0,
                    "ram_percent": 40.0,
                }
                with open(path / "system.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(sample) + "\n")
            if step % eval_every == 0 or step == total:
                val = loss_at(step) * 0.98 if not math.isnan(loss) else 3.0
                metrics = {
                    "val/loss": val,
                    "val/ppl": math.exp(val),
                    "val/bpb": val / 2.7,
                    "val/tokens": 81920,
                }
                run.metrics.write(
                    {"step": step, "time": t, "tokens": step * tokens_per_step, **metrics}
                )
                event(step, "eval", **metrics)
                for prompt in ("def ", "The "):
                    run.samples.write(
                        {
                            "step": step,
                            "time": t,
                            "prompt": prompt,
                            "text": prompt + f"sample text at step {step} <&>",
                        }
                    )
            if step % checkpoint_every == 0 or step == total:
                name = f"step_{step:07d}"
                d = path / "checkpoints" / name
                d.mkdir(parents=True, exist_ok=True)
                (d / "model.safetensors").write_bytes(b"\0" * 2048)
                (d / "train_state.pt").write_bytes(b"\0" * 1024)
                (d / "meta.json").write_text(
                    json.dumps(
                        {
                            "tokens": step * tokens_per_step,
                            "step": step,
                            "files": {
                                "model.safetensors": {"bytes": 2048, "sha256": "x"},
                                "train_state.pt": {"bytes": 1024, "sha256": "y"},
                            },
                        }
                    )
                )
                event(step, "checkpoint", path=name, tokens=step * tokens_per_step)
                kept.append(step)
                for old in kept[:-2]:  # keep_last=2
                    for f in (path / "checkpoints" / f"step_{old:07d}").iterdir():
                        f.unlink()
                    (path / "checkpoints" / f"step_{old:07d}").rmdir()
                kept = kept[-2:]
            if crash_at is not None and seg_index == 0 and step == crash_at:
                ended = False
                break
        if not ended and seg_index == 0 and not resume:
            break
        ended = True
    if ended:
        event(total, "end", tokens=total * tokens_per_step)
    run.close()
    if torn_line:
        with open(path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write('{"step": 999999, "time": 1.0, "train/lo')  # killed mid-write
    return path


if __name__ == "__main__":
    out = write_synthetic_run(
        sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic",
        nan_steps=[250],
        spike_steps=[320, 410],
        stall=(450, 470),
    )
    print(f"wrote {out}")
