"""Run overviews: reading run directories (also torn, crashed, resumed, rolled back), status,
down-sampling, the report page's content, and the report/runs CLI."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest

from plinth.cli import main
from plinth.report.downsample import downsample
from plinth.report.report import render_report
from plinth.report.rundata import health, load_run, parse_config_lines, run_status, summarize
from plinth.report.synthetic import write_synthetic_run
from plinth.track.run import RunDir


def payload(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="plinth-data">(.*?)</script>', html, re.S)
    assert m, "the page carries its data"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root / "faulty", nan_steps=[250], spike_steps=[320, 410], stall=(450, 470))
    write_synthetic_run(root / "crashed", steps=500, crash_at=430, torn_line=True)
    write_synthetic_run(root / "resumed", steps=500, crash_at=430, resume=True)
    write_synthetic_run(root / "rolled", steps=500, rollback=(330, 200))
    write_synthetic_run(root / "live", steps=500, crash_at=300, end_time=time.time())
    return root


# ------------------------------------------------------------------------ down-sampling


def test_downsample_keeps_spikes_nonfinite_events_and_ends():
    n = 200_000
    rng = np.random.default_rng(0)
    y = 3 + 0.01 * rng.standard_normal(n)
    y[123_457] = 50.0  # a one-step spike
    y[7] = -10.0
    y[99_999] = math.nan
    y[150_001] = math.inf
    x = np.arange(n)
    idx = downsample(x, [y], max_points=1000, keep_x=[77_777, 180_000])
    assert len(idx) <= 1000 + 10
    assert idx == sorted(set(idx))
    for must in (0, n - 1, 123_457, 7, 99_999, 150_001, 77_777, 180_000):
        assert must in idx
    assert downsample([1, 2, 3], [[1.0, 2.0, 3.0]], max_points=10) == [0, 1, 2]


def test_downsample_thins_long_nonfinite_stretches():
    n = 50_000
    y = np.full(n, math.nan)
    y[:100] = 1.0
    idx = downsample(np.arange(n), [y], max_points=500, max_nonfinite=1000)
    assert len(idx) < 1000
    assert 100 in idx  # the first NaN survives


# ------------------------------------------------------------------------ reading runs


def test_config_lines_carry_sources():
    text = (
        "seed: 1337\noptim:\n  lr: 0.003  # command line\n  name: adamw\n"
        "tracking:\n  run_name: 'a # b'  # file configs/x.yaml\n  sinks: [jsonl]\n"
    )
    lines = {ln.key: ln for ln in parse_config_lines(text)}
    assert lines["optim.lr"].source == "command line"
    assert lines["optim.lr"].text.strip() == "lr: 0.003"
    assert lines["optim.name"].source is None
    assert lines["tracking.run_name"].source == "file configs/x.yaml"
    assert "'a # b'" in lines["tracking.run_name"].text
    assert lines["tracking.sinks"].source is None and lines["seed"].source is None


def test_summary_and_health_of_a_faulty_finished_run(runs_dir):
    run = load_run(runs_dir / "faulty")
    s = summarize(run)
    assert s["status"] == "finished"
    assert (s["step"], s["total_steps"], s["tokens"]) == (600, 600, 600 * 4096)
    val = [p["value"] for p in run.series("val/loss")]
    assert s["best_val_loss"] == min(val) and s["val_loss"] == val[-1]
    assert s["wall_s"] == pytest.approx(600 * 0.5, rel=0.02)
    assert s["compute_h"] == pytest.approx(s["wall_s"] / 3600)
    assert s["git_sha"].startswith("0123") and s["data_fingerprint"].startswith("sha256:")
    h = health(run)
    assert (h["nonfinite"], h["spikes"], h["skipped"], h["stalls"], h["rollbacks"]) == (
        1,
        2,
        3,
        1,
        0,
    )
    loss = run.series("train/loss")
    assert math.isnan(loss[249]["value"]) and loss[249]["step"] == 250


def test_status_rule():
    from plinth.report.rundata import Run

    run = Run(path=__import__("pathlib").Path("x"))
    t0 = 1_000_000.0
    run.events = [{"step": 0, "time": t0, "event": "start"}]
    run.records = [{"step": i, "time": t0 + i} for i in range(1, 101)]
    last = t0 + 100
    assert run_status(run, now=last + 60) == "running"
    assert run_status(run, now=last + 599) == "running"
    assert run_status(run, now=last + 601) == "crashed"
    run.records = [{"step": i, "time": t0 + 300 * i} for i in range(1, 11)]  # slow logging
    last = t0 + 3000
    assert run_status(run, now=last + 1400) == "running"  # 5 x 300 s interval
    assert run_status(run, now=last + 1600) == "crashed"
    run.events.append({"step": 10, "time": last, "event": "end"})
    assert run_status(run, now=last + 10**6) == "finished"
    run.events.append({"step": 10, "time": last + 5, "event": "start"})  # extended again
    assert run_status(run, now=last + 10) == "running"
    run.events.append({"step": 11, "time": last + 6, "event": "anomaly", "action": "halt"})
    assert run_status(run, now=last + 10) == "halted"


def test_crashed_run_with_torn_line(runs_dir):
    run = load_run(runs_dir / "crashed")
    s = summarize(run)
    assert s["status"] == "crashed"
    assert s["step"] == 430  # the torn record (step 999999) is skipped
    assert all(r["step"] <= 500 for r in run.records)
    html = render_report(run)
    assert "crashed" in html and payload(html)["charts"]


def test_live_run_reads_as_running(runs_dir):
    s = summarize(load_run(runs_dir / "live"))
    assert s["status"] == "running" and s["step"] == 300
    assert s["last_record_age_s"] < 60


def test_resumed_run_keeps_the_final_trajectory_and_excludes_downtime(runs_dir):
    run = load_run(runs_dir / "resumed")
    steps = [p["step"] for p in run.series("train/loss")]
    assert steps == list(range(1, 501))  # replayed steps 401..430 appear once
    s = summarize(run)
    assert s["status"] == "finished"
    assert health(run)["resumes"] == 1
    executed = 430 + (500 - 400)
    assert s["wall_s"] == pytest.approx(executed * 0.5, rel=0.03)  # not the hour in between
    assert len(run.segments()) == 2


def test_rolled_back_run(runs_dir):
    run = load_run(runs_dir / "rolled")
    steps = [p["step"] for p in run.series("train/loss")]
    assert steps == list(range(1, 501))
    assert health(run)["rollbacks"] == 1 and health(run)["blowups"] == 1
    assert summarize(run)["step"] == 500
    data = payload(render_report(run))
    kinds = {m["kind"] for m in data["markers"]}
    assert {"rollback", "anomaly", "checkpoint", "end"} <= kinds


def test_minimal_run_directory(tmp_path):
    run = RunDir(tmp_path / "bare")
    run.log_metrics(1, **{"train/loss": 5.0, "grad_norm": math.nan, "new_metric": 1.5})
    run.log_metrics(2, **{"train/loss": 4.0, "grad_norm": 1.0, "new_metric": 1.2, "note": "x"})
    run.close()
    html = render_report(load_run(run.path))
    ids = [c["id"] for c in payload(html)["charts"]]
    assert "loss" in ids and "grad" in ids and "m0" in ids  # unknown metrics get a chart
    assert "No config.yaml" in html and "No manifest.json" in html
    empty = RunDir(tmp_path / "empty")
    empty.close()
    (empty.path / "manifest.json").write_text("{not json")
    assert "No metrics yet" in render_report(load_run(empty.path))


# ------------------------------------------------------------------------ the page


def test_report_page_content(runs_dir):
    run = load_run(runs_dir / "faulty")
    html = render_report(run, max_points=150)
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|url\(\s*['\"]?https?:", html)
    assert "MIT License" in html and "uPlot" in html
    data = payload(html)
    charts = {c["id"]: c for c in data["charts"]}
    assert {"loss", "lr", "grad", "throughput", "steptime", "memory", "resources"} <= set(charts)
    train = charts["loss"]["series"][0]
    assert train["label"] == "train loss" and train["smooth"]
    steps = train["x"]["step"]
    assert len(steps) <= 150 + 20  # down-sampled ...
    for s in (250, 320, 410, 450):  # ... keeping the NaN, both spikes and the stall event
        assert s in steps
    assert train["nonfinite"]["step"] == [250] and train["nonfinite"]["values"] == ["NaN"]
    assert train["y"][steps.index(250)] is None
    assert max(v for v in train["y"] if v is not None) > 7  # the spike is still there
    assert train["x"]["tokens"][steps.index(320)] == 320 * 4096
    assert charts["grad"]["hlines"][0]["y"] == 1.0  # the clip line from optim.grad_clip
    assert charts["loss"]["series"][1]["label"] == "val loss"
    kinds = [m["kind"] for m in data["markers"]]
    assert kinds.count("checkpoint") == 3 and kinds.count("anomaly") == 4
    # tables and sections
    for text in (
        "Health",
        "Evaluations",
        "Checkpoints",
        "Events",
        "Samples",
        "Config",
        "Environment",
        "step_0000400",
        "deleted",
        "sha256:5f1e0c9a2b7d",
    ):
        assert text in html
    assert "sample text at step 600 &lt;&amp;&gt;" in html  # escaped, not raw HTML
    assert re.search(r'class="line nondefault">\s*lr: 0.003<span class="src"># command line', html)
    assert "non-default values" in html


def test_report_cli_and_runs_listing(runs_dir, capsys):
    assert main(["report", str(runs_dir / "faulty")]) == 0
    out = capsys.readouterr().out
    assert "faulty: finished, step 600/600" in out
    assert (runs_dir / "faulty" / "report.html").stat().st_size > 50_000

    assert main(["runs", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    for name, status in [
        ("faulty", "finished"),
        ("crashed", "crashed"),
        ("live", "running"),
        ("resumed", "finished"),
        ("rolled", "finished"),
    ]:
        assert re.search(rf"{name}\s.*{status}", out), (name, out)

    assert main(["runs", str(runs_dir), "--status", "crashed", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["run"] for r in rows] == ["crashed"]
    assert rows[0]["step"] == 430

    assert main(["runs", str(runs_dir), "--filter", "r*", "--json"]) == 0
    names = {json.loads(line)["run"] for line in capsys.readouterr().out.splitlines()}
    assert names == {"resumed", "rolled"}

    assert main(["runs", str(runs_dir), "--status", "weird"]) == 2
    assert main(["report", str(runs_dir)]) == 2  # a directory of runs, not a run
    assert main(["runs", str(runs_dir / "nope")]) == 2


KILLED_WRITER = r"""
import math, sys, time
from plinth.track.run import RunDir
run = RunDir(sys.argv[1])
run.log_event(0, "start", total_steps=10**9, params=1, device="cpu")
big = "x" * 20000  # long records make a kill mid-write likely
step = 0
while True:
    step += 1
    run.log_metrics(step, tokens=step * 10, **{"train/loss": 5 / math.sqrt(step), "pad": big})
    if step % 50 == 0:
        run.log_event(step, "checkpoint", path=f"step_{step:07d}")
    if step == 200:
        print("ready", flush=True)
"""


def test_report_of_a_writer_killed_with_sigkill(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    run = load_run(path)
    steps = [p["step"] for p in run.series("train/loss")]
    assert len(steps) >= 200 and steps == list(range(1, len(steps) + 1))
    assert run_status(run) == "killed"  # its pid is gone: no 10-minute wait
    html = render_report(run)
    assert '<span class="badge killed">killed</span>' in html
    assert payload(html)["charts"][0]["series"][0]["x"]["step"][-1] == steps[-1]


def test_report_commands_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, plinth.report.report, plinth.report.compare, plinth.report.runs; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
