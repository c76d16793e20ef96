"""CUDA paths: NCCL, FSDP2's bf16 policy and pretraining on a GPU. Skipped without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plinth.config.load import load_config
from plinth.recipes.pretrain import run_pretraining
from plinth.track.run import read_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_ddp_and_fsdp_on_nccl(tmp_path):
    n = torch.cuda.device_count()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={n}", str(Path(__file__).with_name("gpu_worker.py")), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["plain"][-1] < r["plain"][0] - 1.0
    for a, b in zip(r["plain"], r["ddp"], strict=True):
        assert abs(a - b) < 1e-2  # same data on one GPU; DDP only averages
    for a, b in zip(r["plain"], r["fsdp"], strict=True):
        assert abs(a - b) < 5e-2  # bf16 gathered parameters vs bf16 autocast
    assert r["master_dtype"] == ["torch.float32"]  # the policy keeps fp32 master weights
    assert r["dcp_equal"]


def test_pretrain_on_cuda_bf16_compiled(tiny_overrides):
    r = load_config(
        [],
        [
            *tiny_overrides,
            "hardware.device=cuda",
            "hardware.precision=bf16",
            "hardware.compile=true",
            "pretrain.max_steps=40",
        ],
    )
    result = run_pretraining(r, progress=False)
    rows = [x for x in read_jsonl(result.run_dir / "metrics.jsonl") if "train/loss" in x]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.7
    assert all(x["mem_mb"] > 0 and x["mfu"] > 0 for x in rows)
    start = next(e for e in read_jsonl(result.run_dir / "events.jsonl") if e["event"] == "start")
    assert start["device"].startswith("cuda")
