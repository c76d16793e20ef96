"""`plinth finetune` under torchrun with 2 processes lowers a micro_batch that does not divide
the global batch over the processes (same global batch), says so once, and trains (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"


def test_ddp_finetune_lowers_the_micro_batch(base_run, tmp_path):
    args = [
        f"finetune.base={base_run}", f"finetune.dataset={DATA / 'json_answers.train.jsonl'}",
        "finetune.max_length=64", "finetune.method=lora", "finetune.rank=4",
        "finetune.max_steps=1", "optim.micro_batch=8", "optim.global_batch=8",
        "hardware.device=cpu", "tracking.eval_every=1000", "tracking.sample_every=1000",
        "--quiet", f"tracking.output_dir={tmp_path}", "tracking.run_name=ddp",
        "distributed.strategy=ddp",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "plinth", "finetune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert out.count("optim.micro_batch lowered from 8 to 4: 2 x 4 sequences") == 1, out[-3000:]
    assert "micro_batch: 4  # lowered to fit 2 process(es)" in (
        tmp_path / "ddp" / "config.yaml"
    ).read_text()
