"""A run killed with SIGKILL mid-training still yields a correct report and resumes, marked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from plinth.report.rundata import load_run, run_status
from plinth.track.run import read_jsonl


def test_sigkill_then_report_then_resume(tiny_overrides, tmp_path):
    out_dir = Path(
        next(o for o in tiny_overrides if o.startswith("tracking.output_dir=")).split("=", 1)[1]
    )
    run = out_dir / "killed"
    cmd = [
        sys.executable,
        "-m",
        "plinth",
        "pretrain",
        "quickstart",
        *tiny_overrides,
        "pretrain.max_steps=40",
        "tracking.run_name=killed",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a checkpoint and a few more steps, then kill
        metrics = read_jsonl(run / "metrics.jsonl")
        if (run / "checkpoints" / "step_0000010").is_dir() and len(metrics) >= 14:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in read_jsonl(run / "metrics.jsonl"))
    assert 10 < killed_at < 40

    # the report reads what is there: a killed run with its curves and checkpoint
    assert (
        subprocess.run(
            [sys.executable, "-m", "plinth", "report", str(run)], capture_output=True, check=False
        ).returncode
        == 0
    )
    html = (run / "report.html").read_text()
    assert "step_0000010" in html and "killed" in html
    data = load_run(run)
    # its writer (this host, pid gone) is dead, however old the last record
    assert run_status(data, now=time.time() + 3600) == "killed"

    resumed = subprocess.run(
        [sys.executable, "-m", "plinth", "pretrain", "--resume", str(run), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    events = read_jsonl(run / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"] == "step_0000010"
    assert events[-1]["event"] == "end" and events[-1]["step"] == 40
    assert run_status(load_run(run)) == "finished"
    steps = [m["step"] for m in read_jsonl(run / "metrics.jsonl") if "train/loss" in m]
    assert steps[-1] == 40 and set(range(1, 41)) <= set(steps)  # steps 11.. re-done after resume
