"""Each metric sink round-trips through its real library's reader; JSONL is always written."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest

from plinth.errors import UsageError
from plinth.track.run import RunDir, read_jsonl
from plinth.track.sinks import MetricLogger, flatten, numeric, open_sinks

CONFIG = {"model": {"d_model": 64, "n_layers": 2}, "optim": {"lr": 0.001, "betas": [0.9, 0.95]}}
RECORDS = [
    (1, {"train/loss": 4.0, "lr": 1e-4, "grad_norm": 2.0, "clipped": True, "mfu": None}),
    (2, {"train/loss": math.nan, "lr": 2e-4, "grad_norm": math.inf, "clipped": False}),
    (3, {"train/loss": 3.5, "lr": 3e-4, "grad_norm": 0.5, "clipped": False, "note": "x"}),
]


def write_run(tmp_path: Path, sinks) -> RunDir:
    run = RunDir(tmp_path / "run")
    logger = MetricLogger(run, sinks(run.path))
    for step, values in RECORDS:
        logger.log_metrics(step, tokens=step * 100, **values)
    logger.log_event(2, "anomaly", type="nonfinite", metric="loss", value=math.nan)
    logger.log_metrics(3, **{"val/loss": 3.7})
    logger.close("finished")
    run.close()
    return run


def check_jsonl(run: RunDir) -> None:
    metrics = read_jsonl(run.path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 3]
    assert math.isnan(metrics[1]["train/loss"]) and metrics[1]["grad_norm"] == math.inf
    (event,) = read_jsonl(run.path / "events.jsonl")
    assert event["event"] == "anomaly" and math.isnan(event["value"])


def test_numeric_and_flatten():
    assert numeric({"step": 1, "a": True, "b": None, "c": "s", "d": 2, "e": math.nan}) == {
        "a": 1.0,
        "d": 2.0,
        "e": pytest.approx(math.nan, nan_ok=True),
    }
    assert flatten(CONFIG)["optim.lr"] == 0.001
    assert flatten(CONFIG)["optim.betas"] == [0.9, 0.95]


def test_jsonl_only(tmp_path):
    assert open_sinks(["jsonl"], tmp_path) == []
    run = write_run(tmp_path, lambda _: [])
    check_jsonl(run)
    with pytest.raises(UsageError, match="unknown metric sink"):
        open_sinks(["neptune"], tmp_path)


def test_failing_sink_is_dropped_and_recorded(tmp_path, capsys):
    class Broken:
        name = "broken"
        closed = False

        def log_metrics(self, step, metrics):
            raise OSError("disk full")

        def log_event(self, step, kind, details):
            raise AssertionError("dropped sinks are not called again")

        def close(self, status="finished"):
            Broken.closed = True

    run = RunDir(tmp_path / "run")
    logger = MetricLogger(run, [Broken()])
    logger.log_metrics(1, **{"train/loss": 2.0})
    logger.log_metrics(2, **{"train/loss": 1.9})
    logger.log_event(2, "checkpoint", path="step_0000002")
    logger.close()
    assert [m["step"] for m in read_jsonl(run.path / "metrics.jsonl")] == [1, 2]
    events = read_jsonl(run.path / "events.jsonl")
    assert [e["event"] for e in events] == ["sink_failed", "checkpoint"]
    assert events[0]["sink"] == "broken" and "disk full" in events[0]["error"]
    assert "metric sink broken failed" in capsys.readouterr().err
    assert not Broken.closed


def test_tensorboard_round_trip(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (track extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = write_run(tmp_path, lambda d: open_sinks(["jsonl", "tensorboard"], d, config=CONFIG))
    check_jsonl(run)
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {
        "train/loss",
        "lr",
        "grad_norm",
        "clipped",
        "tokens",
        "val/loss",
    }
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss[0] == (1, 4.0) and loss[2] == (3, 3.5)
    assert loss[1][0] == 2 and math.isnan(loss[1][1])
    assert [e.value for e in acc.Scalars("grad_norm")][1] == math.inf
    assert [e.value for e in acc.Scalars("clipped")] == [1.0, 0.0, 0.0]
    assert acc.Scalars("lr")[2].value == pytest.approx(3e-4)
    assert {"events/anomaly/text_summary", "config/text_summary"} <= set(tags["tensors"])
    text = acc.Tensors("events/anomaly/text_summary")[0]
    assert text.step == 2 and b"nonfinite" in text.tensor_proto.string_val[0]


def test_mlflow_round_trip_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (track extra)")
    pytest.importorskip("sqlalchemy", reason="MLflow's local SQLite store needs sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = write_run(tmp_path, lambda d: open_sinks(["mlflow"], d, config=CONFIG))
    check_jsonl(run)
    uri = f"sqlite:///{run.path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = (run.path / "mlflow_run_id").read_text().strip()
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    assert info.data.params["optim.lr"] == "0.001"
    assert info.data.params["model.n_layers"] == "2"
    assert info.data.tags["plinth.status"] == "finished"
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert loss[0] == (1, 4.0) and loss[2] == (3, 3.5) and math.isnan(loss[1][1])
    grad = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "grad_norm"))
    assert grad[1][1] > 1e308  # SQLite has no infinity; MLflow stores the largest float
    assert [m.value for m in client.get_metric_history(run_id, "events/anomaly")] == [1.0]
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [3]

    # a resumed plinth run keeps logging into the same MLflow run
    (sink,) = open_sinks(["mlflow"], run.path, config=CONFIG)
    assert sink.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    sink.log_metrics(4, {"train/loss": 3.0})
    sink.close("failed")
    assert client.get_run(run_id).info.status == "FAILED"
    assert len(client.get_metric_history(run_id, "train/loss")) == 4
    assert len(client.search_runs([info.info.experiment_id])) == 1


def read_wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): a LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if pos + length > len(data):  # still being written
            return
        chunks += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            yield rec


def test_wandb_offline_round_trip(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (track extra)")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = write_run(tmp_path, lambda d: open_sinks(["wandb"], d, config=CONFIG))
    check_jsonl(run)
    (log,) = (run.path / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing sent
    # wandb-core (a separate process) may still be writing the log when finish() returns
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        records = list(read_wandb_records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    history, config, exit_code = [], {}, None
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
        elif kind == "run":
            for item in rec.run.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    steps = [(r["step"], r.get("train/loss")) for r in history if "train/loss" in r]
    assert [s for s, _ in steps] == [1, 2, 3]
    assert steps[0][1] == 4.0 and steps[2][1] == 3.5
    assert str(steps[1][1]).lower() == "nan" or math.isnan(float(steps[1][1]))
    assert any(r.get("events/anomaly") == 1 and r["step"] == 2 for r in history)
    assert any(r.get("val/loss") == 3.7 and r["step"] == 3 for r in history)
    assert config["optim"]["lr"] == 0.001
    assert exit_code == 0


def test_missing_library_is_a_usage_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'", name="wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UsageError, match=r"plinth\[track\]"):
        open_sinks(["wandb"], tmp_path)
