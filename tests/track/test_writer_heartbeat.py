"""writer.json: a run's writer (pid, host, heartbeat) and the `killed` status of a run whose
writer is gone, with a real training process killed by SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from plinth.report.rundata import load_run, run_status
from plinth.track.run import RunDir
from plinth.track.writer import STALE_AFTER_S, WRITER_FILE, read_writer, writer_alive

SRC = Path(__file__).resolve().parents[2] / "src"


def plinth(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "plinth", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def listed(root: Path) -> dict[str, str]:
    out = plinth("runs", str(root), "--json")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return {json.loads(line)["run"]: json.loads(line)["status"] for line in out.stdout.splitlines()}


def test_a_sigkilled_training_run_shows_as_killed(tiny_overrides, tmp_path):
    root = tmp_path / "runs"
    over = [*tiny_overrides, "pretrain.max_steps=100000", "tracking.run_name=victim",
            "tracking.checkpoint_every=100000", "tracking.eval_every=100000",
            "tracking.sample_every=100000"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "plinth", "pretrain", "quickstart", *over, "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    run = root / "victim"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for real training steps
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count("train/loss") >= 3:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        else:
            raise AssertionError("no training steps within 120 s")
        writer = read_writer(run)
        assert writer["pid"] == proc.pid and writer["host"] == socket.gethostname()
        assert "closed" not in writer
        assert listed(root) == {"victim": "running"}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert listed(root) == {"victim": "killed"}  # at once, not after a 10-minute timeout
    out = plinth("report", str(run))
    assert out.returncode == 0 and "victim: killed" in out.stdout
    assert '<span class="badge killed">killed</span>' in (run / "report.html").read_text()
    table = plinth("runs", str(root))
    assert "killed" in table.stdout and "running" not in table.stdout
    filtered = plinth("runs", str(root), "--status", "killed", "--json")
    assert [json.loads(x)["run"] for x in filtered.stdout.splitlines()] == ["victim"]


def _fake_writer(path: Path, **fields) -> Path:
    run = RunDir(path, heartbeat=False)
    run.log_event(0, "start", total_steps=100)
    run.log_metrics(1, **{"train/loss": 3.0})
    run.close()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "heartbeat": time.time(), "interval_s": 30.0, **fields}
    (path / WRITER_FILE).write_text(json.dumps(record))
    return path


def test_status_from_the_writer_record(tmp_path):
    now = time.time()
    # this very process: alive
    assert run_status(load_run(_fake_writer(tmp_path / "me"))) == "running"
    # a pid that was reused by another process (its start time differs): gone
    reused = _fake_writer(tmp_path / "reused", pid_start=1)
    assert run_status(load_run(reused)) == "killed"
    # another machine: judged by its heartbeat
    fresh = _fake_writer(tmp_path / "far", host="elsewhere-node", pid=1, heartbeat=now - 5)
    assert run_status(load_run(fresh)) == "running"
    assert run_status(load_run(fresh), now=now + STALE_AFTER_S + 10) == "killed"
    # ended on purpose without an end event (Ctrl-C) / with an error
    ctrl_c = _fake_writer(tmp_path / "ctrlc", exit="killed", closed=now)
    assert run_status(load_run(ctrl_c)) == "killed"
    failed = _fake_writer(tmp_path / "failed", exit="failed", closed=now)
    assert run_status(load_run(failed)) == "crashed"
    # an end event still wins, and a garbled writer.json falls back to record times
    ended = _fake_writer(tmp_path / "ended", pid=2**22 + 12345)
    with open(ended / "events.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "time": now, "event": "end"}) + "\n")
    assert run_status(load_run(ended)) == "finished"
    garbled = _fake_writer(tmp_path / "garbled")
    (garbled / WRITER_FILE).write_text("{not json")
    assert read_writer(garbled) == {} and writer_alive({}) is None
    assert run_status(load_run(garbled)) == "running"  # fresh records: legacy rule
    assert run_status(load_run(garbled), now=now + 3600) == "crashed"
    for bad_pid in (0, -1, True, "12"):  # never signals a process group or everyone
        assert writer_alive({"pid": bad_pid, "host": socket.gethostname()}) is None


def test_heartbeat_thread_keeps_the_record_fresh_and_close_marks_it(tmp_path):
    from plinth.track.writer import Heartbeat

    hb = Heartbeat(tmp_path, interval=0.05)
    first = read_writer(tmp_path)["heartbeat"]
    time.sleep(0.3)
    assert read_writer(tmp_path)["heartbeat"] > first
    hb.set_exit("killed")
    hb.close()
    rec = read_writer(tmp_path)
    assert rec["exit"] == "killed" and rec["closed"] >= rec["started"]
    assert writer_alive(rec) is False
    assert not hb._thread.is_alive()
