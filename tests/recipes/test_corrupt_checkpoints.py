"""Checkpoints whose files pass the size and checksum checks but do not deserialize.

Each kind of damage records the damaged file's true size and SHA-256 in meta.json (or damages
meta.json itself), so only deserializing finds it. Per kind: `pretrain --resume` falls back to
the previous good checkpoint and says why; `generate` on the run falls back and says so on
stderr; `generate` and `finetune.base` on the damaged checkpoint itself exit 2 naming the file,
with nothing written or changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from plinth.cli import main
from plinth.config.load import load_config

SRC = Path(__file__).resolve().parents[2] / "src"
DATA = Path(__file__).resolve().parents[2] / "configs" / "data"


@pytest.fixture(scope="module")
def done_run(tiny_base, tmp_path_factory) -> Path:
    """A tiny finished pretraining run with checkpoints at steps 2 and 4."""
    from plinth.recipes.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("runs")
    over = [*tiny_base, "pretrain.max_steps=4", "tracking.checkpoint_every=2",
            "tracking.eval_every=2", "tracking.keep_last=5", f"tracking.output_dir={out}",
            "tracking.run_name=done"]
    return run_pretraining(load_config(["quickstart"], over), progress=False).run_dir


def _record(ckpt: Path, name: str, data: bytes) -> None:
    """Write `data` as ckpt/name and record its real size and checksum in meta.json."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def zip_not_torch(ckpt: Path) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes/readme.txt", "a zip archive, but not a torch file")
    _record(ckpt, "train_state.pt", buf.getvalue())
    return "train_state.pt does not deserialize"


def bad_safetensors_header(ckpt: Path) -> str:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:24] = b"{not a header!!!"
    _record(ckpt, "model.safetensors", bytes(data))
    return "model.safetensors does not deserialize"


def huge_safetensors_header(ckpt: Path) -> str:
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")  # a header longer than the file
    _record(ckpt, "model.safetensors", bytes(data))
    return "model.safetensors does not deserialize"


def random_optimizer_bytes(ckpt: Path) -> str:
    size = (ckpt / "train_state.pt").stat().st_size  # the optimizer state lives in it
    _record(ckpt, "train_state.pt", os.urandom(size))
    return "train_state.pt does not deserialize"


def torch_file_not_a_state(ckpt: Path) -> str:
    buf = io.BytesIO()
    torch.save([torch.zeros(3)], buf)
    _record(ckpt, "train_state.pt", buf.getvalue())
    return "train_state.pt holds a list"


def random_rank_file(ckpt: Path) -> str:
    _record(ckpt, "ranks/rank_00000.pt", os.urandom(512))
    return "rank_00000.pt does not deserialize"


def manifest_wrong_shape(ckpt: Path) -> str:
    (ckpt / "meta.json").write_text(json.dumps({"step": 4, "files": ["model.safetensors"]}))
    return "meta.json is valid JSON but not a checkpoint manifest"


def manifest_a_list(ckpt: Path) -> str:
    (ckpt / "meta.json").write_text("[1, 2, 3]")
    return "meta.json is valid JSON but not a checkpoint manifest"


KINDS = [zip_not_torch, bad_safetensors_header, huge_safetensors_header, random_optimizer_bytes,
         torch_file_not_a_state, random_rank_file, manifest_wrong_shape, manifest_a_list]


def _damaged_copy(done_run: Path, tmp_path: Path, kind) -> tuple[Path, Path, str]:
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    bad = run / "checkpoints" / "step_0000004"
    return run, bad, kind(bad)


def _snapshot(root: Path) -> dict[str, str]:
    # writer.json names the last process that opened the run (its liveness record), not data
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != "writer.json"}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_resume_falls_back_to_the_previous_good_checkpoint(done_run, tmp_path, kind, capsys):
    run, _, why = _damaged_copy(done_run, tmp_path, kind)
    good = _snapshot(run / "checkpoints" / "step_0000002")
    assert main(["pretrain", "--resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint step_0000004 ({why}" in out and "using step_0000002" in out
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert skipped and why in skipped[-1]["reason"]
    assert [e for e in events if e["event"] == "resume"][-1]["checkpoint"] == "step_0000002"
    # steps 3-4 again, exactly as the first time; the good checkpoint is untouched
    ends = [e for e in events if e["event"] == "end"]
    assert len(ends) == 2 and ends[0]["train_loss"] == ends[1]["train_loss"]
    assert _snapshot(run / "checkpoints" / "step_0000002") == good


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_generate_on_the_run_falls_back_and_says_so(done_run, tmp_path, kind, capsys):
    run, _, why = _damaged_copy(done_run, tmp_path, kind)
    before = _snapshot(run)
    assert main(["generate", str(run), "--prompt", "the", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint step_0000004 ({why}" in err and "using step_0000002" in err
    assert _snapshot(run) == before


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_generate_on_the_damaged_checkpoint_is_refused(done_run, tmp_path, kind, capsys):
    run, bad, why = _damaged_copy(done_run, tmp_path, kind)
    before = _snapshot(run)
    assert main(["generate", str(bad), "--prompt", "the", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and why in err and "another checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _snapshot(run) == before


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_damaged_checkpoint_as_finetune_base_is_refused(done_run, tmp_path, kind, capsys):
    run, bad, why = _damaged_copy(done_run, tmp_path, kind)
    before = _snapshot(run)
    out = tmp_path / "ft"
    argv = ["finetune", f"finetune.base={bad}",
            f"finetune.dataset={DATA / 'json_answers.train.jsonl'}", "finetune.max_length=32",
            "finetune.max_steps=1", f"tracking.output_dir={out}", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and why in err and "Traceback" not in err
    assert _snapshot(run) == before
    assert not out.exists() or not any(out.iterdir())  # no run directory was started


def test_real_processes_generate_and_serve_refuse_a_damaged_checkpoint(done_run, tmp_path):
    run, bad, why = _damaged_copy(done_run, tmp_path, zip_not_torch)
    before = _snapshot(run)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for argv in (["generate", str(bad), "--prompt", "x"], ["serve", str(bad), "--port", "18765"]):
        p = subprocess.run([sys.executable, "-m", "plinth", *argv], capture_output=True,
                           text=True, env=env, timeout=300)
        assert p.returncode == 2, p.stderr
        assert why in p.stderr and str(bad) in p.stderr
        assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "plinth", "generate", str(run), "--prompt", "x",
                        "--max-new-tokens", "2"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "skipping checkpoint step_0000004" in p.stderr and "using step_0000002" in p.stderr
    assert _snapshot(run) == before


def test_resuming_a_finished_run_changes_nothing(done_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    before = _snapshot(run)
    last = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()][-1]
    assert main(["pretrain", "--resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "already finished (step 4" in out
    assert f"final train loss {last['train_loss']:.4f}" in out and "nan" not in out
    assert _snapshot(run) == before  # no NaN end event, no new records
