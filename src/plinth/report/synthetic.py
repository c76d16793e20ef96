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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    path = Path(path)
    run = RunDir(path, heartbeat=False)  # fake times: status by record age
    overrides = list(overrides)
    resolved = load_config([], overrides)
    run.write_config(render_yaml(resolved) + "\n")

    segments = _segments(steps, crash_at, resume, rollback, checkpoint_every)
    n_exec = sum(len(s) for s, _ in segments)
    downtime = sum(d for _, d in segments)
    last = end_time if end_time is not None else time.time() - 86400
    t = last - n_exec * step_seconds - downtime - 5.0
    run.write_manifest(_manifest(t - 30, overrides, seed, git_sha, data_fingerprint))

    writer = _Writer(
        path=path,
        run=run,
        rng=rng,
        t=t,
        lr=resolved.config.optim.lr,
        grad_clip=resolved.config.optim.grad_clip,
        total=steps,
        log_every=log_every,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        nan_steps=set(nan_steps),
        spike_steps=set(spike_steps),
        stall=stall,
        offset=offset,
        noise=noise,
        step_seconds=step_seconds,
        tokens_per_step=tokens_per_step,
        system=system,
    )
    ended = True
    for seg_index, (seg_steps, gap) in enumerate(segments):
        writer.t += gap
        writer.start(seg_steps[0] - 1, resumed=seg_index > 0)
        prev = seg_steps[0] - 1
        for step in seg_steps:
            if step <= prev:  # a rollback: the guard restored an earlier checkpoint
                writer.roll_back(prev, step)
            prev = step
            writer.step(step)
            if crash_at is not None and seg_index == 0 and step == crash_at:
                ended = False
                break
        if not ended and seg_index == 0 and not resume:
            break
        ended = True
    if ended:
        writer.event(steps, "end", tokens=steps * tokens_per_step)
    run.close()
    if torn_line:
        with open(path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write('{"step": 999999, "time": 1.0, "train/lo')  # killed mid-write
    return path


def _segments(
    total: int,
    crash_at: int | None,
    resume: bool,
    rollback: tuple[int, int] | None,
    checkpoint_every: int,
) -> list[tuple[list[int], float]]:
    """The order in which steps are executed, with the downtime before each segment."""
    if crash_at is not None:
        segments = [(list(range(1, crash_at + 1)), 0.0)]
        if resume:
            ckpt = (crash_at // checkpoint_every) * checkpoint_every
            segments.append((list(range(ckpt + 1, total + 1)), 3600.0))
        return segments
    if rollback is not None:
        at, to = rollback
        return [(list(range(1, at + 1)) + list(range(to + 1, total + 1)), 0.0)]
    return [(list(range(1, total + 1)), 0.0)]


def _manifest(
    created: float, overrides: list[str], seed: int, git_sha: str, data_fingerprint: str
) -> dict[str, Any]:
    return {
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


@dataclass
class _Writer:
    """Writes the records of one step after another on a simulated clock (`t`). Every random
    draw comes from `rng` in a fixed order, so a seed always writes the same run."""

    path: Path
    run: RunDir
    rng: random.Random
    t: float
    lr: float
    grad_clip: float | None
    total: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    nan_steps: set[int]
    spike_steps: set[int]
    stall: tuple[int, int] | None
    offset: tuple[int, float] | None
    noise: float
    step_seconds: float
    tokens_per_step: int
    system: bool
    kept: list[int] = field(default_factory=list)  # checkpoints on disk (keep_last=2)

    def event(self, step: int, kind: str, **details) -> None:
        self.run.events.write({"step": step, "time": self.t, "event": kind, **details})

    def anomaly(self, step: int, **details) -> None:
        self.event(step, "anomaly", **details)

    def loss_at(self, step: int) -> float:
        base = 2.0 + 6.0 * (1 + step / 60) ** -0.5
        if self.offset and step >= self.offset[0]:
            base += self.offset[1]
        return base * (1 + self.noise * self.rng.gauss(0, 1))

    def start(self, step: int, resumed: bool) -> None:
        self.event(step, "start", total_steps=self.total, params=1_234_567, device="cpu")
        if resumed:
            self.event(
                step,
                "resume",
                checkpoint=f"step_{step:07d}",
                tokens=step * self.tokens_per_step,
            )

    def roll_back(self, prev: int, step: int) -> None:
        """The guard gave up at `prev` and restored the checkpoint before `step`."""
        self.anomaly(
            prev,
            type="blowup",
            metric="anomalies",
            value=4.0,
            threshold=4.0,
            window_mean=None,
            window_std=None,
            z=None,
            action="rollback",
        )
        self.event(
            prev,
            "rollback",
            to_step=step - 1,
            checkpoint=f"step_{step - 1:07d}",
            skipped_batches=prev - step + 1,
        )

    def step(self, step: int) -> None:
        """One training step: its faults, metrics, system sample, eval and checkpoint."""
        self.t += self.step_seconds
        lr = (
            self.lr
            * min(1.0, step / 50)
            * (0.55 + 0.45 * math.cos(math.pi * step / self.total))
        )
        loss, grad, tps = self.train_values(step)
        if step % self.log_every == 0:
            self.log_metrics(step, loss, lr, grad, tps)
        if self.system and step % 10 == 0:
            self.log_system(step)
        if step % self.eval_every == 0 or step == self.total:
            self.evaluate(step, loss)
        if step % self.checkpoint_every == 0 or step == self.total:
            self.checkpoint(step)

    def train_values(self, step: int) -> tuple[float, float, float]:
        """Loss, gradient norm and throughput of a step, with the injected faults (and their
        anomaly events)."""
        loss = self.loss_at(step)
        grad = 0.4 + 2.0 * math.exp(-step / 80) + 0.05 * abs(self.rng.gauss(0, 1))
        if step in self.spike_steps:
            loss += 4.0
            grad *= 12
            self.anomaly(
                step,
                type="spike",
                metric="loss",
                value=loss,
                threshold=loss - 1.0,
                window_mean=loss - 4.0,
                window_std=0.1,
                z=40.0,
                action="skip_step",
            )
        if step in self.nan_steps:
            loss, grad = math.nan, math.inf
            self.anomaly(
                step,
                type="nonfinite",
                metric="loss",
                value=loss,
                threshold=None,
                window_mean=None,
                window_std=None,
                z=None,
                action="skip_step",
            )
        tps = 8192.0 * (1 + 0.02 * self.rng.gauss(0, 1))
        if self.stall and self.stall[0] <= step <= self.stall[1]:
            tps /= 10
            if step == self.stall[0]:
                self.anomaly(
                    step,
                    type="stall",
                    metric="tokens_per_s",
                    value=tps,
                    threshold=2048.0,
                    window_mean=8192.0,
                    window_std=150.0,
                    z=None,
                    action="log",
                )
        return loss, grad, tps

    def log_metrics(self, step: int, loss: float, lr: float, grad: float, tps: float) -> None:
        self.run.metrics.write(
            {
                "step": step,
                "time": self.t,
                "tokens": step * self.tokens_per_step,
                "train/loss": loss,
                "lr": lr,
                "grad_norm": grad,
                "clipped": grad > (self.grad_clip or math.inf),
                "tokens_per_s": tps,
                "step_time": self.tokens_per_step / tps,
                "data_share": 0.04 + 0.01 * self.rng.random(),
                "mfu": 0.31 * tps / 8192,
                "mem_mb": 1800.0 + 20 * math.sin(step / 30),
            }
        )

    def log_system(self, step: int) -> None:
        sample = {
            "time": self.t,
            "cpu_percent": 180 + 10 * self.rng.random(),
            "sys_cpu_percent": 92.0,
            "rss_mb": 950 + step * 0.05,
            "ram_used_mb": 6000.0,
            "ram_percent": 40.0,
        }
        with open(self.path / "system.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(sample) + "\n")

    def evaluate(self, step: int, loss: float) -> None:
        """Validation metrics, their event and a sample per prompt."""
        # a non-finite step draws no noise here: the seed's sequence of draws stays as it was
        val = self.loss_at(step) * 0.98 if not math.isnan(loss) else 3.0
        metrics = {
            "val/loss": val,
            "val/ppl": math.exp(val),
            "val/bpb": val / 2.7,
            "val/tokens": 81920,
        }
        self.run.metrics.write(
            {"step": step, "time": self.t, "tokens": step * self.tokens_per_step, **metrics}
        )
        self.event(step, "eval", **metrics)
        for prompt in ("def ", "The "):
            self.run.samples.write(
                {
                    "step": step,
                    "time": self.t,
                    "prompt": prompt,
                    "text": prompt + f"sample text at step {step} <&>",
                }
            )

    def checkpoint(self, step: int) -> None:
        """A checkpoint directory of placeholder files; only the last two are kept."""
        name = f"step_{step:07d}"
        d = self.path / "checkpoints" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(b"\0" * 2048)
        (d / "train_state.pt").write_bytes(b"\0" * 1024)
        (d / "meta.json").write_text(
            json.dumps(
                {
                    "tokens": step * self.tokens_per_step,
                    "step": step,
                    "files": {
                        "model.safetensors": {"bytes": 2048, "sha256": "x"},
                        "train_state.pt": {"bytes": 1024, "sha256": "y"},
                    },
                }
            )
        )
        self.event(step, "checkpoint", path=name, tokens=step * self.tokens_per_step)
        self.kept.append(step)
        for old in self.kept[:-2]:
            for f in (self.path / "checkpoints" / f"step_{old:07d}").iterdir():
                f.unlink()
            (self.path / "checkpoints" / f"step_{old:07d}").rmdir()
        self.kept = self.kept[-2:]


if __name__ == "__main__":
    out = write_synthetic_run(
        sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic",
        nan_steps=[250],
        spike_steps=[320, 410],
        stall=(450, 470),
    )
    print(f"wrote {out}")
