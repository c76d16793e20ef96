"""Task evaluation during training (`tracking.eval_tasks`): recorded like validation loss."""

from __future__ import annotations

import json

import pytest

from plinth.config.load import load_config
from plinth.errors import PlinthError, UsageError
from plinth.recipes.pretrain import run_pretraining


def test_tasks_are_scored_during_pretraining(tiny_overrides):
    over = [*tiny_overrides, "pretrain.max_steps=10", "tracking.eval_tasks=[capitals, arithmetic]",
            "tracking.eval_tasks_every=5", "tracking.eval_tasks_limit=4", "model.max_seq_len=64"]
    result = run_pretraining(load_config(["quickstart"], over), progress=False)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in rows if "eval/capitals/acc" in r}
    assert sorted(scored) == [5, 10]
    for r in scored.values():
        assert 0 <= r["eval/capitals/acc"] <= 1 and 0 <= r["eval/arithmetic/exact_match"] <= 1
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "task_eval"] == [5, 10]
    # the overview shows them, and what `plinth eval RUN` adds afterwards
    from plinth.cli import main

    assert main(["eval", str(result.run_dir), "--tasks", "facts", "--limit", "3"]) == 0
    assert main(["report", str(result.run_dir)]) == 0
    html = (result.run_dir / "report.html").read_text()
    start = html.index("<h2>Evaluations")
    evals = html[start:html.index("<h2>", start + 1)]  # that section alone
    assert "eval/capitals/acc" in evals and "Task evaluations (plinth eval)" in evals
    assert "facts" in evals and "acc " in evals


def test_an_unknown_task_stops_before_training(tiny_overrides):
    over = [*tiny_overrides, "pretrain.max_steps=10", "tracking.eval_tasks=[capitalz]"]
    with pytest.raises(UsageError, match="capitals"):
        run_pretraining(load_config(["quickstart"], over), progress=False)


def test_encoders_are_refused(tiny_overrides):
    over = [*tiny_overrides, "model.arch=encoder", "tracking.eval_tasks=[capitals]"]
    with pytest.raises(PlinthError, match="needs a decoder"):
        run_pretraining(load_config(["quickstart"], over), progress=False)
