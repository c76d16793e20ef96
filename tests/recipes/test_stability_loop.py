"""The stability guard inside the real loop: NaN steps are skipped, a blow-up rolls back past the
poisoned batches and finishes healthy, a blow-up without a way back halts with exit code 1."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from plinth.cli import main
from plinth.config.load import load_config
from plinth.data import open_dataset
from plinth.errors import ConfigError
from plinth.track.run import RunDir, read_jsonl
from plinth.train.loop import train

GUARD = [
    "stability.window=16",
    "stability.min_history=8",
    "stability.blowup_count=3",
    "stability.blowup_steps=8",
]


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if kind in (None, e["event"])]


def run_with_hook(overrides: list[str], name: str, hook):
    cfg = load_config([], [*overrides, f"tracking.run_name={name}"]).config
    run = RunDir(Path(cfg.tracking.output_dir) / name)
    return run.path, train(cfg, open_dataset(cfg.data.dir), run, progress=False, fault_hook=hook)


def test_nan_loss_step_is_skipped_and_training_continues(tiny_overrides):
    def hook(i, loss):  # micro-batches 30 and 31 make optimizer step 16 (accum 2)
        return loss * math.nan if i in (30, 31) else loss

    path, result = run_with_hook([*tiny_overrides, "pretrain.max_steps=30", *GUARD], "nan", hook)
    first = events(path, "anomaly")[0]
    assert (first["step"], first["type"], first["action"]) == (16, "nonfinite", "skip_step")
    metrics = {m["step"]: m for m in read_jsonl(path / "metrics.jsonl") if "train/loss" in m}
    assert math.isnan(metrics[16]["train/loss"])  # recorded honestly, not dropped
    assert all(math.isfinite(metrics[s]["train/loss"]) for s in range(17, 31))
    assert result.step == 30 and math.isfinite(result.val["val/loss"])


def test_blowup_rolls_back_past_poisoned_batches_and_finishes_healthy(tiny_overrides):
    poisoned = set(range(44, 50))  # micro-batches of steps 23..25: loss (and grads) x 50

    def hook(i, loss):
        return loss * 50 if i in poisoned else loss

    path, result = run_with_hook([*tiny_overrides, "pretrain.max_steps=50", *GUARD], "blowup", hook)
    spikes = [e for e in events(path, "anomaly") if e["type"] == "spike"]
    assert spikes[0]["step"] == 23 and spikes[0]["z"] > 6
    rollback = events(path, "rollback")
    assert [(r["to_step"], r["checkpoint"]) for r in rollback] == [(20, "step_0000020")]
    assert events(path)[-1]["event"] == "end" and result.step == 50 and not result.halted
    losses = [m["train/loss"] for m in read_jsonl(path / "metrics.jsonl") if "train/loss" in m]
    assert all(math.isfinite(x) for x in losses[-10:])
    assert losses[-1] < losses[0] - 0.7 and result.val["val/loss"] < losses[0] - 0.5


def test_blowup_with_no_rollbacks_left_halts(tiny_overrides):
    def hook(i, loss):
        return loss * 50 if i in range(44, 50) else loss

    path, result = run_with_hook(
        [*tiny_overrides, "pretrain.max_steps=40", *GUARD, "stability.max_rollbacks=0"],
        "halt",
        hook,
    )
    assert result.halted and result.step == 24  # halted at step 25, the third spike
    assert events(path, "anomaly")[-1]["action"] == "halt" and not events(path, "end")


def test_halt_on_nonfinite_exits_1_from_the_command_line(tiny_overrides, capsys, monkeypatch):
    import plinth.train.task as task  # where the pretraining task computes its loss

    real, calls = task.compute_loss, []

    def nan_after_ten(*args, **kwargs):  # every loss after the 10th micro-batch is NaN
        out = real(*args, **kwargs)
        calls.append(1)
        return out if len(calls) <= 10 else type(out)(out.loss * math.nan, out.n_tokens, out.ce)

    monkeypatch.setattr(task, "compute_loss", nan_after_ten)
    code = main(
        [
            "pretrain",
            "quickstart",
            *tiny_overrides,
            "pretrain.max_steps=20",
            "stability.on_nonfinite=halt",
            "tracking.run_name=nanhalt",
            "--quiet",
        ]
    )
    assert code == 1 and "training halted after step 5" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["stability.z_threshold=-1", "stability.window=2"])
def test_guard_settings_are_validated(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        load_config([], [bad])
