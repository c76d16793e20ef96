"""Tracking overhead against the ref-cpu-decoder training step (the issue's budget: < 2%).

    python bench/bench_logging.py [--steps 3] [--log-every 10] [--sinks tensorboard]

Times real optimizer steps of the `ref-cpu-decoder` workload (6 layers, d_model 384, seq 256,
micro-batch 8, fp32, AdamW), then the per-step cost of everything tracking adds around such a
step: the stability guard (every step), one metrics record through `MetricLogger` into
metrics.jsonl (+ optional sinks) every `log_every` steps, and one resource-sampler reading
every `interval` seconds. Prints `name: value` lines and the overhead as a share of the step.
Exit code 1 when the share exceeds 2%.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_step_seconds(steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from plinth.config.load import load_config
    from plinth.models import build_model

    torch.manual_seed(0)
    cfg = load_config([REPO / "configs" / "ref-cpu-decoder.yaml"]).config
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    micro, seq = cfg.optim.micro_batch, cfg.model.max_seq_len
    batch = torch.randint(0, cfg.model.vocab_size, (micro, seq + 1))

    def step() -> None:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def tracking_seconds_per_step(log_every: int, sinks: list[str], interval: float) -> dict:
    from plinth.config.schema import StabilityConfig
    from plinth.track.run import RunDir
    from plinth.track.sampler import ResourceSampler
    from plinth.track.sinks import MetricLogger, open_sinks
    from plinth.train.stability import StabilityGuard

    n = 20_000
    guard = StabilityGuard(StabilityConfig())
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        guard.observe(i, 3.0 + 0.01 * math.sin(i), 1.0 + 0.01 * math.cos(i))
    guard_s = (time.perf_counter() - t0) / n

    with tempfile.TemporaryDirectory() as d:
        run = RunDir(Path(d) / "run")
        logger = MetricLogger(run, open_sinks(sinks, run.path))
        m = 2_000
        t0 = time.perf_counter()
        for i in range(1, m + 1):
            logger.log_metrics(
                i,
                tokens=i * 2048,
                **{"train/loss": 3.0},
                lr=1e-3,
                grad_norm=1.0,
                clipped=False,
                tokens_per_s=5e3,
                step_time=0.4,
                data_share=0.01,
                mfu=0.2,
                mem_mb=900.0,
            )
        record_s = (time.perf_counter() - t0) / m
        logger.close()
        sampler = ResourceSampler(run.path / "system.jsonl")
        sampler.sample()
        t0 = time.perf_counter()
        for _ in range(200):
            sampler.sample()
        sample_s = (time.perf_counter() - t0) / 200
        run.close()
    return {
        "guard_s": guard_s,
        "record_s": record_s,
        "sample_s": sample_s,
        "interval": interval,
        "log_every": log_every,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--interval", type=float, default=10.0, help="sampler interval (s)")
    ap.add_argument("--sinks", nargs="*", default=[])
    args = ap.parse_args()

    step_s = train_step_seconds(args.steps)
    t = tracking_seconds_per_step(args.log_every, args.sinks, args.interval)
    per_step = (
        t["guard_s"]
        + t["record_s"] / args.log_every
        + t["sample_s"] * step_s / args.interval  # readings that fall within one step
    )
    share = per_step / step_s
    print(f"ref_cpu_decoder_step_ms: {1e3 * step_s:.1f}")
    print(f"stability_guard_us_per_step: {1e6 * t['guard_s']:.2f}")
    print(
        f"metrics_record_us ({'jsonl' + ''.join('+' + s for s in args.sinks)}): "
        f"{1e6 * t['record_s']:.1f}"
    )
    print(f"sampler_reading_us: {1e6 * t['sample_s']:.1f}")
    print(f"tracking_us_per_step: {1e6 * per_step:.2f}")
    print(f"tracking_overhead_pct: {100 * share:.4f}")
    print(f"ratio_tracking_to_step: {share:.6f}")
    return 0 if share < 0.02 else 1


if __name__ == "__main__":
    raise SystemExit(main())
