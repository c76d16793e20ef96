"""What the real training loop costs beyond the bare step, on the ref-cpu-decoder workload.

    python bench/bench_loop_overhead.py [--steps 12]

In one process: (a) a bare loop (forward, backward, clip, AdamW step) and (b) plinth's
`train()` with everything on and metrics logged every step (the worst case: guard, metrics
record, update-ratio snapshot, progress line, sampler thread), same model size, data and
optimizer. Compares median step times (train()'s own `step_time_p50`, which excludes the
periodic evaluation and checkpoints). Prints `name: value` lines; goal: overhead < 2%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()

    import torch

    from plinth.config.load import load_config
    from plinth.data import PackedLoader, open_dataset, prepare_dataset
    from plinth.models import build_model
    from plinth.track.run import RunDir, read_jsonl
    from plinth.train.loop import train
    from plinth.train.objectives import compute_loss
    from plinth.train.optim import build_optimizer
    from plinth.train.task import special_token_ids

    tmp = Path(tempfile.mkdtemp())
    overrides = [
        f"data.dir={tmp / 'data'}",
        "data.max_docs=300",
        f"pretrain.max_steps={args.steps}",
        "tracking.log_every=1",
        f"tracking.eval_every={10**6}",
        f"tracking.checkpoint_every={10**6}",
        f"tracking.sample_every={10**6}",
        "optim.warmup_steps=2",
    ]
    cfg = load_config([REPO / "configs" / "ref-cpu-decoder.yaml"], overrides).config
    ds = open_dataset(prepare_dataset(cfg, progress=False))

    # (a) bare loop
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    loader = iter(PackedLoader(ds, "train", cfg.model.max_seq_len, cfg.optim.micro_batch, seed=0))
    special = special_token_ids(ds)
    bare = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = compute_loss("clm", model, next(loader), special)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bare.append(time.perf_counter() - t0)
    bare_s = statistics.median(bare[2:])

    # (b) the real loop, logging every step (train's last step adds eval/checkpoint: excluded)
    run = RunDir(tmp / "run")
    train(cfg, ds, run, progress=True)
    times = [m["step_time"] for m in read_jsonl(run.path / "metrics.jsonl") if "step_time" in m]
    loop_s = statistics.median(times[2:-1])
    print(f"bare_step_s: {bare_s:.4f}")
    print(f"loop_step_s: {loop_s:.4f}")
    print(f"loop_overhead_pct: {100 * (loop_s / bare_s - 1):.2f}")
    print(f"ratio_loop_to_bare: {loop_s / bare_s:.4f}")


if __name__ == "__main__":
    main()
