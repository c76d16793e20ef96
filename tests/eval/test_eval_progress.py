"""`plinth eval --tasks` shows a bar per task on a terminal (long suites are not silent) and
nothing on a pipe (logs stay clean)."""

from __future__ import annotations

import io
import json
import sys

from plinth.eval.commands import score_tasks
from plinth.eval.scoring import load_eval_model
from plinth.eval.tasks import load_task


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _tasks(tmp_path):
    rows = [{"question": f"w{i} w{i + 1}", "choices": ["w3", "w4"], "answer": i % 2}
            for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(
        'name: tiny_mc\ntype: multiple_choice\ndata: t.jsonl\nprompt: "{question}"\n')
    return [load_task(tmp_path / "t.yaml")]


def test_progress_on_a_terminal(tiny_hf, tmp_path, monkeypatch):
    lm = load_eval_model(str(tiny_hf[1]))
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    seen = []
    import plinth.eval.scoring as scoring

    real = scoring._report
    monkeypatch.setattr(scoring, "_report", lambda *a: (seen.append(a), real(*a)))
    results = score_tasks(lm, _tasks(tmp_path), None, None, 2)
    assert results[0].n == 6
    out = term.getvalue()
    assert "tiny_mc: done in" in out and "tasks" in out
    assert seen and seen[-1][0] == seen[-1][1] == 12  # every request scored, reported


def test_no_progress_on_a_pipe(tiny_hf, tmp_path, monkeypatch):
    lm = load_eval_model(str(tiny_hf[1]))
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    score_tasks(lm, _tasks(tmp_path), None, None, 2)
    assert pipe.getvalue() == ""
