"""What the loop records about a run: checkpoints carry only their own step's validation, and
the metric sinks learn how the run ended (finished, or killed and resumable)."""

from __future__ import annotations

import json

import pytest
import torch

from plinth.config.load import load_config
from plinth.recipes.pretrain import run_pretraining
from plinth.track.run import read_jsonl


def test_checkpoint_at_a_step_without_evaluation_carries_no_val_loss(tiny_overrides):
    over = [
        *tiny_overrides,
        "pretrain.max_steps=4",
        "tracking.eval_every=2",
        "tracking.checkpoint_every=3",
        "tracking.keep_last=5",
    ]
    result = run_pretraining(load_config([], over), progress=False)
    ckpts = result.run_dir / "checkpoints"
    meta3 = json.loads((ckpts / "step_0000003" / "meta.json").read_text())
    meta4 = json.loads((ckpts / "step_0000004" / "meta.json").read_text())
    assert "val/loss" not in meta3  # step 3 was not evaluated: step 2's loss is not its own
    assert meta4["val/loss"] == result.val["val/loss"]  # the last step is evaluated
    events = {e["step"]: e for e in read_jsonl(result.run_dir / "events.jsonl")
              if e["event"] == "checkpoint"}
    assert "val/loss" not in events[3] and "val/loss" in events[4]
    # the checkpoint kept as best is one that was evaluated
    counters = torch.load(ckpts / "step_0000004" / "train_state.pt", weights_only=True)["counters"]
    assert counters["best_path"].endswith("step_0000004")


def _mlflow_status(run_dir) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return client.get_run((run_dir / "mlflow_run_id").read_text().strip()).info.status


def test_sinks_hear_killed_for_an_interrupted_run_and_finished_at_the_end(
    tiny_overrides, monkeypatch
):
    """The real MLflow store (local SQLite) sees KILLED while the run can be resumed (it saw
    FINISHED before), then FINISHED once the resumed run ends."""
    pytest.importorskip("mlflow", reason="mlflow not installed (track extra)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    over = [*tiny_overrides, "pretrain.max_steps=4", "tracking.checkpoint_every=2",
            "tracking.sinks=[jsonl, mlflow]"]
    resolved = load_config([], over)
    first = run_pretraining(resolved, progress=False, stop_after=2)
    assert first.step == 2 and _mlflow_status(first.run_dir) == "KILLED"
    second = run_pretraining(resolved, run_path=first.run_dir, progress=False)
    assert second.step == 4 and _mlflow_status(first.run_dir) == "FINISHED"


def test_ctrl_c_closes_the_sinks_as_killed(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (track extra)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    over = [*tiny_overrides, "pretrain.max_steps=4", "tracking.sinks=[jsonl, mlflow]",
            "tracking.run_name=ctrl-c"]

    def interrupt(micro: int, loss):
        if micro == 3:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        run_pretraining(load_config([], over), progress=False, fault_hook=interrupt)
    assert _mlflow_status(tmp_path / "runs" / "ctrl-c") == "KILLED"
