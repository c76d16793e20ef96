"""Files plinth writes for people get the normal mode of a new file (0666 less the umask, 0644
typically), not safetensors' 0600: `plinth import`, `plinth export` (a real subprocess) and a
training checkpoint, under two umasks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plinth.track.files import default_mode, save_safetensors

SRC = str(Path(__file__).resolve().parents[2] / "src")


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_save_safetensors_gives_the_normal_mode(tmp_path, umask, mask):
    umask(mask)
    assert default_mode() == 0o666 & ~mask
    save_safetensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~mask
    assert os.umask(mask) == mask  # reading the umask left it as it was


def test_import_and_export_write_0644(tmp_path, umask, tiny_hf):
    from plinth.hf import import_model

    umask(0o022)
    hf, _ = tiny_hf
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    from infer_helpers import word_tokenizer

    word_tokenizer(96).save(str(src / "tokenizer.json"))
    imported = import_model(src, tmp_path / "imported")
    got = modes(imported)
    assert "model.safetensors" in got and set(got.values()) == {0o644}, got

    out = tmp_path / "exported"
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "plinth", "export", str(imported), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = modes(out)
    assert "model.safetensors" in got and set(got.values()) == {0o644}, got


def test_checkpoint_weights_get_the_normal_mode(tmp_path, umask):
    from plinth.train.state import MODEL_FILE, save_checkpoint

    umask(0o022)
    d = save_checkpoint(tmp_path / "checkpoints", 1, torch.nn.Linear(3, 2), {"step": 1}, {})
    assert stat.S_IMODE((d / MODEL_FILE).stat().st_mode) == 0o644
