"""What the loop records about a run: checkpoints carry only their own step's validation, and
the metric sinks learn how the run ended (finished, or killed and resumable)."""

from __future__ import annotations

import json
from typing import ClassVar

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


class Recorder:
    """A metric sink that remembers how it was closed."""

    name = "recorder"
    closed: ClassVar[list[str]] = []

    def log_metrics(self, step, metrics):
        pass

    def log_event(self, step, kind, details):
        pass

    def close(self, status="finished"):
        Recorder.closed.append(status)


def test_sinks_hear_killed_for_an_interrupted_run_and_finished_at_the_end(
    tiny_overrides, monkeypatch
):
    import plinth.track.sinks as sinks

    monkeypatch.setattr(sinks, "open_sinks", lambda *a, **k: [Recorder()])
    Recorder.closed = []
    over = [*tiny_overrides, "pretrain.max_steps=4", "tracking.checkpoint_every=2"]
    resolved = load_config([], over)
    first = run_pretraining(resolved, progress=False, stop_after=2)
    assert first.step == 2 and Recorder.closed == ["killed"]
    second = run_pretraining(resolved, run_path=first.run_dir, progress=False)
    assert second.step == 4 and Recorder.closed == ["killed", "finished"]
