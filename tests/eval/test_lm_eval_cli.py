"""lm-eval's own command line on a plinth model. lm-eval 0.4 finds models only in its own table
(no plugin entry points), so plain `lm_eval --model plinth` cannot; `python -m
plinth.eval.harness` (the `plinth-lm-eval` script) is lm-eval's CLI with "plinth" registered.
Both are run here as real processes on the tiny imported model and a local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="the adapter needs lm-eval (pip install 'plinth[eval]')")

SRC = str(Path(__file__).resolve().parents[2] / "src")
TASK = (
    "task: tiny_mc\ndataset_path: json\n"
    "dataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
    "output_type: multiple_choice\ndoc_to_text: '{{{{q}}}}'\ndoc_to_choice: '{{{{choices}}}}'\n"
    "doc_to_target: '{{{{answer}}}}'\n"
    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
)


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.fixture
def task_dir(tmp_path) -> Path:
    rows = [{"q": "w5 w6 w7", "choices": ["w8", "w9 w10", "w11"], "answer": i % 3}
            for i in range(4)]
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=json.dumps(str(data))))
    return tasks


def test_lm_evals_cli_runs_plinths_model(tiny_hf, task_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", "plinth", "--model_args", f"model={tiny_hf[1]},batch_size=4",
            "--tasks", "tiny_mc", "--include_path", str(task_dir), "--output_path", str(out)]
    r = run(["-m", "plinth.eval.harness", *args], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny_mc" in r.stdout and "acc" in r.stdout  # lm-eval's own results table
    results = list(out.rglob("results_*.json"))
    assert results, list(out.rglob("*"))
    got = json.loads(results[0].read_text())["results"]["tiny_mc"]
    assert 0.0 <= got["acc,none"] <= 1.0


@pytest.mark.slow
def test_plain_lm_eval_does_not_find_plugin_models(tiny_hf, task_dir, tmp_path):
    """Why the module above exists: lm-eval 0.4 has no model entry points. When a release
    adds them, this fails, and plinth can register an entry point instead."""
    r = run(["-m", "lm_eval", "--model", "plinth", "--model_args", f"model={tiny_hf[1]}",
             "--tasks", "tiny_mc", "--include_path", str(task_dir)], tmp_path)
    assert r.returncode != 0 and "no model for this name found" in r.stderr


def test_bad_plinth_input_through_lm_evals_cli_is_exit_2(task_dir, tmp_path):
    r = run(["-m", "plinth.eval.harness", "--model", "plinth", "--model_args",
             f"model={tmp_path / 'no-such-model'}", "--tasks", "tiny_mc",
             "--include_path", str(task_dir)], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "no-such-model" in r.stderr and "Traceback" not in r.stderr
