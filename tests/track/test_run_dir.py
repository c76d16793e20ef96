"""The run directory: non-finite values survive JSON, torn lines are skipped, runs never clash."""

from __future__ import annotations

import json
import math

from plinth.track.run import RunDir, read_jsonl, unique_run_path


def test_non_finite_values_are_encoded_not_dropped(tmp_path):
    run = RunDir(tmp_path / "r")
    run.log_metrics(1, loss=math.nan, grad_norm=math.inf, other=-math.inf, ok=1.5)
    run.close()
    raw = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert '"loss": "NaN"' in raw and '"grad_norm": "Infinity"' in raw
    json.loads(raw)  # strict JSON
    rec = read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]
    assert math.isnan(rec["loss"]) and rec["grad_norm"] == math.inf and rec["other"] == -math.inf
    assert rec["ok"] == 1.5


def test_records_are_flushed_as_written_and_torn_line_skipped(tmp_path):
    run = RunDir(tmp_path / "r")
    run.log_event(3, "checkpoint", path="step_0000003")
    # visible before close: a killed process loses nothing already logged
    assert read_jsonl(tmp_path / "r" / "events.jsonl")[0]["event"] == "checkpoint"
    with open(tmp_path / "r" / "events.jsonl", "a") as f:
        f.write('{"step": 4, "ev')  # killed mid-write
    assert len(read_jsonl(tmp_path / "r" / "events.jsonl")) == 1
    run.close()


def test_unique_run_path_never_reuses_a_run(tmp_path):
    assert unique_run_path(tmp_path, "q") == tmp_path / "q"
    (tmp_path / "q").mkdir()
    (tmp_path / "q-2").mkdir()
    assert unique_run_path(tmp_path, "q") == tmp_path / "q-3"
