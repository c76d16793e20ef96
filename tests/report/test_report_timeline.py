"""A real training run in the overview: every checkpoint (files in ranks/ and sharded/ too) is
complete, and `plinth eval RUN` shows its results without changing the training timeline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.config.load import load_config
from plinth.report.report import render_report
from plinth.report.rundata import load_run, summarize
from plinth.track.run import RunDir

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    from plinth.recipes.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("trained")
    over = [*tiny_base, f"tracking.output_dir={out}", "pretrain.max_steps=10",
            "tracking.checkpoint_every=5", "tracking.run_name=real"]
    return run_pretraining(load_config(["quickstart"], over), progress=False).run_dir


def test_real_checkpoints_are_complete(trained):
    run = load_run(trained)
    on_disk = [c for c in run.checkpoints if c["on_disk"]]
    assert [c["step"] for c in on_disk] == [5, 10]
    for c in on_disk:
        ck = trained / "checkpoints" / c["name"]
        assert (ck / "ranks").is_dir()  # per-rank RNG states live in a sub-directory
        assert c["complete"] is True, c
        assert c["bytes"] == sum(f.stat().st_size for f in ck.rglob("*") if f.is_file())
    html = render_report(run)
    section = html[html.index("<h2>Checkpoints"):]
    section = section[: section.index("<h2>", 5)]
    assert "incomplete" not in section and section.count("on disk") == 2


def _write_checkpoint(ck: Path, files: dict[str, bytes]) -> None:
    meta = {}
    for name, data in files.items():
        f = ck / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        meta[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / "meta.json").write_text(json.dumps({"step": 4, "tokens": 64, "files": meta}))


def test_sharded_checkpoint_layout_and_damage(tmp_path):
    """A torchrun/fsdp layout (sharded/ DCP files, ranks/ per rank): complete when every file
    meta.json lists has its size; a truncated or missing sub-directory file is incomplete."""
    run = RunDir(tmp_path / "sharded", heartbeat=False)
    run.log_event(0, "start", total_steps=8)
    run.log_metrics(4, **{"train/loss": 3.0})
    run.close()
    files = {
        "sharded/.metadata": b"m" * 100,
        "sharded/__0_0.distcp": b"a" * 4000,
        "sharded/__1_0.distcp": b"b" * 4000,
        "ranks/rank_00000.pt": b"r" * 300,
        "ranks/rank_00001.pt": b"s" * 300,
        "train_state.pt": b"t" * 500,
    }
    for name in ("step_0000004", "step_0000008", "step_0000012", "step_0000016"):
        _write_checkpoint(run.checkpoints / name, files)
    (run.checkpoints / "step_0000008" / "sharded" / "__1_0.distcp").write_bytes(b"b" * 10)
    (run.checkpoints / "step_0000012" / "ranks" / "rank_00001.pt").unlink()
    meta = run.checkpoints / "step_0000016" / "meta.json"  # hostile meta: entries not dicts
    meta.write_text(json.dumps({"files": {"../x": 3, "ranks/rank_00000.pt": None}}))
    state = {c["step"]: c["complete"] for c in load_run(run.path).checkpoints}
    assert state == {4: True, 8: False, 12: False, 16: False}


EVAL_TEXT = "the cat sat on the mat. " * 20


def test_plinth_eval_keeps_the_training_timeline(trained, tmp_path):
    run = trained
    events_before = (run / "events.jsonl").read_bytes()
    before = summarize(load_run(run))
    (tmp_path / "notes.txt").write_text(EVAL_TEXT)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-m", "plinth", "eval", str(run), "--tasks", "capitals", "--limit", "2",
         "--text", str(tmp_path / "notes.txt")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "evals.jsonl" in out.stdout
    assert (run / "events.jsonl").read_bytes() == events_before  # the timeline is untouched
    after_run = load_run(run)
    after = summarize(after_run)
    for key in ("wall_s", "compute_h", "status", "step", "created"):
        assert after[key] == before[key], key
    html = render_report(after_run)
    evals = html[html.index("<h2>Evaluations"):]
    evals = evals[: evals.index("<h2>", 5)]
    assert "Task evaluations (plinth eval)" in evals
    assert "capitals" in evals and "notes.txt" in evals and "perplexity" in evals


def test_older_runs_with_evals_in_their_events_keep_their_wall_time(tmp_path):
    """Runs evaluated by an older plinth carry task_eval / lm_eval events (with a `model`) in
    events.jsonl, appended long after training: they are read as evaluations, not timeline."""
    run = RunDir(tmp_path / "old", heartbeat=False)
    t0 = 1_700_000_000.0
    run.events.write({"step": 0, "time": t0, "event": "start", "total_steps": 10})
    for step in range(1, 11):
        run.metrics.write({"step": step, "time": t0 + 48 * step, "train/loss": 3.0 - step / 10})
    run.events.write({"step": 10, "time": t0 + 480, "event": "task_eval",
                      "eval/capitals/acc": 0.5})  # scored during training: timeline
    run.events.write({"step": 10, "time": t0 + 480, "event": "end"})
    run.events.write({"step": 10, "time": t0 + 2280, "event": "task_eval", "model": "runs/old",
                      "task": "capitals", "metrics": {"acc": 0.75}, "n": 2, "shots": 0})
    run.events.write({"step": 10, "time": t0 + 2280, "event": "lm_eval", "model": "runs/old",
                      "source": "notes.txt", "perplexity": 9.0, "bits_per_byte": 1.2})
    run.close()
    loaded = load_run(run.path)
    s = summarize(loaded)
    assert s["wall_s"] == pytest.approx(480)  # 8 minutes, not 38
    assert s["status"] == "finished"
    assert [e["event"] for e in loaded.evals] == ["task_eval", "lm_eval"]
    assert sum(e["event"] == "task_eval" for e in loaded.events) == 1
    from plinth.report.rundata import evaluations

    ev = evaluations(loaded)
    assert ev["capitals acc"] == 0.75 and ev["notes.txt perplexity"] == 9.0
