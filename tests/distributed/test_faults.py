"""A rank that dies or hangs stops the others with a clear error instead of a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launcher import write_config

WORKER = Path(__file__).with_name("fault_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(config: str, mode: str, *overrides: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), config, mode, *overrides],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_lost_rank_gives_a_clear_error(tiny_overrides, tmp_path, mode):
    config = write_config(tiny_overrides, tmp_path / "tiny.yaml")
    procs = start_ranks(
        config,
        mode,
        "pretrain.max_steps=20",
        "distributed.strategy=ddp",
        "distributed.timeout_s=10",
    )
    t0 = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    waited = time.monotonic() - t0
    assert procs[0].returncode == 1, out[-3000:]
    assert "error: rank 0 of 2 lost contact with the other ranks at step" in out, out[-3000:]
    assert "distributed.timeout_s=10" in out and "--resume" in out
    if mode == "hang":  # gave up after the timeout, not at once and not never
        assert 10 <= waited < 90, waited
