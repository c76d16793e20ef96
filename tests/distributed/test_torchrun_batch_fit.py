"""Shipped recipes run as written under `torchrun --nproc_per_node=2` (issue 16): the
quickstart recipe's global batch (16) equals its micro_batch (16), so 2 processes lower the
micro-batch to 8 (same global batch, same math), say so once, and record it in config.yaml."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from plinth.config.load import load_config
from plinth.track.run import read_jsonl

# the quickstart recipe at toy size: its optim settings (global 16, micro 16) stay as shipped
SMALL = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=512",
    "model.max_seq_len=32", "pretrain.max_steps=2", "optim.warmup_steps=1",
    "tracking.eval_every=2", "tracking.eval_batches=2", "tracking.checkpoint_every=2",
    "tracking.sample_every=1000", "hardware.device=cpu",
]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "plinth", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread per rank
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_quickstart_recipe_runs_on_two_processes(tiny_data_dir, tmp_path):
    shipped = load_config(["quickstart"]).config.optim
    assert (shipped.global_batch, shipped.micro_batch) == (16, 16)  # what this test is about
    proc = _torchrun(["pretrain", "configs/quickstart.yaml", *SMALL, f"data.dir={tiny_data_dir}",
                      f"tracking.output_dir={tmp_path}", "--quiet"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    note = "optim.micro_batch lowered from 16 to 8: 2 x 8 sequences x 1 accumulation step"
    assert out.count(note) == 1, out[-3000:]  # rank 0 says it, once
    run = tmp_path / "quickstart"
    assert "micro_batch: 8  # lowered to fit 2 process(es)" in (run / "config.yaml").read_text()
    m = [r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert m and m[-1]["step"] == 2 and m[-1]["tokens"] == 2 * 16 * 32  # global batch kept


@pytest.mark.slow  # in one process: test_distributed_env's test_world_size_must_divide_...
def test_an_unsplittable_global_batch_is_refused_before_anything_is_written(tiny_data_dir,
                                                                           tmp_path):
    proc = _torchrun(["pretrain", "configs/quickstart.yaml", *SMALL, "optim.global_batch=15",
                      f"data.dir={tiny_data_dir}", f"tracking.output_dir={tmp_path}", "--quiet"])
    out = proc.stdout + proc.stderr
    assert "global batch of 15 sequences does not split evenly over 2 processes" in out, out
    assert "optim.global_batch to a multiple of 2 sequences (e.g. 16)" in out
    # torchrun reports a failed child with its own traceback; none comes from plinth
    assert proc.returncode != 0 and not re.search(r'File ".*/plinth/', out), out[-3000:]
    assert not (tmp_path / "quickstart").exists()
