"""A `data prepare` killed with SIGKILL leaves its temporary build next to data.dir; the next
run removes it (and only plinth's own leftovers), and puts back a dataset that was moved aside
when the kill came while publishing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from datahelpers import SRC, run_plinth, write_config, write_text_corpus


def _start_prepare(cfg):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, "-m", "plinth", "data", "prepare", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )


def test_next_run_removes_the_build_of_a_killed_prepare(tmp_path):
    write_text_corpus(tmp_path / "texts", 1500, seed=2)
    cfg = write_config(
        tmp_path / "cfg.yaml", tmp_path / "ds",
        [{"kind": "text", "path": str(tmp_path / "texts")}],
    )
    # look-alikes that are not plinth's: a user's directory and a file with the same shape
    (tmp_path / ".ds.tmp-123").mkdir()
    (tmp_path / ".ds.tmp-123" / "notes.md").write_text("mine")
    (tmp_path / ".ds.old-9").write_text("a file, not a directory")
    (tmp_path / ".other.tmp-5").mkdir()
    (tmp_path / ".other.tmp-5" / "clean.txt").write_text("another dataset's build")

    proc = _start_prepare(cfg)
    build = tmp_path / f".ds.tmp-{proc.pid}"
    deadline = time.monotonic() + 90
    while not (build / "clean.txt").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "prepare finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert build.is_dir() and not (tmp_path / "ds").exists()  # what the kill left behind
    for f in sorted((tmp_path / "texts").iterdir())[50:]:  # a quick second run
        f.unlink()

    r = run_plinth("data", "prepare", cfg, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"removed {build}" in r.stderr and "left by a killed run" in r.stderr
    assert not build.exists()
    assert (tmp_path / "ds" / "manifest.json").is_file()
    assert (tmp_path / ".ds.tmp-123" / "notes.md").read_text() == "mine"
    assert (tmp_path / ".ds.old-9").read_text() == "a file, not a directory"
    assert (tmp_path / ".other.tmp-5" / "clean.txt").is_file()
    assert not (tmp_path / "ds" / ".plinth-building").exists()


def test_a_dataset_moved_aside_by_a_killed_publish_is_put_back(tmp_path):
    write_text_corpus(tmp_path / "texts", 30, seed=6)
    cfg = write_config(
        tmp_path / "cfg.yaml", tmp_path / "ds",
        [{"kind": "text", "path": str(tmp_path / "texts")}],
    )
    assert run_plinth("data", "prepare", cfg).returncode == 0
    manifest = (tmp_path / "ds" / "manifest.json").read_text()
    # the state a kill between publish's two renames leaves: the old dataset moved aside,
    # the new build complete, data.dir missing
    os.rename(tmp_path / "ds", tmp_path / ".ds.old-4242")
    (tmp_path / ".ds.tmp-4243").mkdir()
    (tmp_path / ".ds.tmp-4243" / ".plinth-building").write_text("")
    r = run_plinth("data", "prepare", cfg)
    assert r.returncode == 0, r.stderr
    assert "restored" in r.stderr and "up to date" in r.stderr  # put back, not rebuilt
    assert (tmp_path / "ds" / "manifest.json").read_text() == manifest
    assert not (tmp_path / ".ds.old-4242").exists() and not (tmp_path / ".ds.tmp-4243").exists()
    assert json.loads(manifest)["format"] == "plinth-dataset"
