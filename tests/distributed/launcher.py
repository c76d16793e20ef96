"""Launch `plinth pretrain` under torchrun on CPU (gloo) for the multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys

from plinth.config.load import load_config
from plinth.config.render import render_yaml
from plinth.track.run import read_jsonl

# dropout off and a constant schedule: runs of different lengths agree step for step
EXACT = [
    "model.dropout=0",
    "optim.schedule=constant",
    "optim.micro_batch=2",
    "hardware.device=cpu",  # gloo on CPU even where a GPU is visible
]


def write_config(overrides: list[str], path) -> str:
    """The config as a YAML file, the way a user would hand it to torchrun."""
    path.write_text(render_yaml(load_config([], [*overrides, *EXACT])))
    return str(path)


def launch(nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`plinth pretrain ARGS` under torchrun (nproc=1: a plain process)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "plinth", "pretrain", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "plinth",
            "pretrain",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread per rank
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if key in r}
