"""`plinth pretrain --resume` refuses before any data work, and never rebuilds or replaces the
dataset a run trained on: the data directory is byte-for-byte and mtime-for-mtime unchanged
after every refusal, and a resume continues on the dataset it started with."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from datahelpers import run_plinth, write_text_corpus

from plinth.errors import UsageError
from plinth.recipes.pretrain import pretrain

TINY = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=512",
    "model.max_seq_len=32", "optim.micro_batch=2", "optim.global_batch=2",
    "optim.warmup_steps=1", "pretrain.max_steps=2", "tracking.log_every=1",
    "tracking.eval_every=100", "tracking.eval_batches=1", "tracking.checkpoint_every=2",
    "tracking.sample_every=100", "data.workers=1",
]


def _snapshot(d: Path) -> dict:
    files = [p for p in sorted(d.rglob("*")) if p.is_file()]
    return {
        p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
        for p in files
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-step run on a text corpus: (root, run directory, config file)."""
    root = tmp_path_factory.mktemp("resume")
    write_text_corpus(root / "texts", 40, seed=8)
    cfg = root / "cfg.yaml"
    cfg.write_text(json.dumps({"data": {
        "dir": str(root / "data"), "sources": [{"kind": "text", "path": str(root / "texts")}],
    }}))
    pretrain(str(cfg), [*TINY, f"tracking.output_dir={root / 'runs'}", "tracking.run_name=r"],
             quiet=True)
    return root, root / "runs" / "r", cfg


@pytest.fixture
def fresh(trained, tmp_path):
    """A private copy of the trained run and its dataset (config paths rewritten)."""
    root = trained[0]
    shutil.copytree(root, tmp_path / "w", symlinks=True)
    w = tmp_path / "w"
    for f in (w / "cfg.yaml", w / "runs" / "r" / "config.yaml"):
        f.write_text(f.read_text().replace(str(root), str(w)))
    return w, w / "runs" / "r"


def _resume(run: Path, *extra):
    """In-process (the CLI turns UsageError into exit 2: checked by the first test)."""
    pretrain(None, list(extra), resume=str(run), quiet=True)


def test_run_without_checkpoints_is_refused_before_the_changed_inputs_are_rebuilt(fresh):
    w, run = fresh
    shutil.rmtree(run / "checkpoints")
    (w / "texts" / "doc0000.txt").write_text("changed since the dataset was prepared. " * 20)
    before = _snapshot(w / "data")
    r = run_plinth("pretrain", "--resume", run, "--quiet", timeout=300)
    assert r.returncode == 2, r.stderr  # bad input, as the training loop says it
    assert "no usable checkpoint" in r.stderr and str(run) in r.stderr
    assert "Traceback" not in r.stderr
    assert _snapshot(w / "data") == before
    assert not any(p.name.startswith(".data.tmp") for p in w.iterdir())


def test_changed_config_and_missing_run_are_refused_with_data_untouched(fresh):
    w, run = fresh
    before = _snapshot(w / "data")
    with pytest.raises(UsageError, match=r"model\.d_model"):
        _resume(run, "model.d_model=64")
    with pytest.raises(UsageError, match="no such run directory"):
        _resume(w / "runs" / "nope")
    assert _snapshot(w / "data") == before


def test_a_replaced_dataset_is_refused_not_trained_on(fresh):
    w, run = fresh
    # someone re-prepared data.dir from other inputs since the run started
    for f in sorted((w / "texts").iterdir())[:20]:
        f.unlink()
    r = run_plinth("data", "prepare", w / "cfg.yaml", "model.vocab_size=512", "--force")
    assert r.returncode == 0, r.stderr
    before = _snapshot(w / "data")
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(UsageError, match=r"trained on dataset .* different data"):
        _resume(run, "pretrain.max_steps=4")
    assert _snapshot(w / "data") == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == steps


def test_changed_inputs_do_not_rebuild_the_dataset_of_a_resumed_run(fresh, capsys):
    w, run = fresh
    (w / "texts" / "doc0001.txt").write_text("a new document the run never saw. " * 20)
    before = _snapshot(w / "data")
    _resume(run, "pretrain.max_steps=4")
    assert "continues on the dataset it started with" in capsys.readouterr().err
    assert _snapshot(w / "data") == before
    assert (run / "checkpoints" / "step_0000004").is_dir()
