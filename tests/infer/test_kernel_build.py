"""The CPU decode kernel's build: one pinned ninja and a cache key that PATH does not change, so
a build is reused whatever ninja comes first on PATH, and a first build says so (never silent).
No test here compiles the kernel: the reuse test runs only where it is built already."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.infer import quant
from plinth.infer.quant import KERNEL_NAME, kernel_build_dir, pinned_ninja

SRC = str(Path(__file__).resolve().parents[2] / "src")


def fake_ninja(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    exe = d / "ninja"
    exe.write_text("#!/bin/sh\necho 0.0.1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return d


def test_build_key_and_ninja_do_not_depend_on_path(tmp_path, monkeypatch):
    pytest.importorskip("ninja")
    monkeypatch.delenv("PLINTH_KERNEL_DIR", raising=False)
    ref = kernel_build_dir()
    fake = str(fake_ninja(tmp_path / "other"))
    for path in (fake + os.pathsep + os.environ.get("PATH", ""), "/usr/bin:/bin", "", fake):
        monkeypatch.setenv("PATH", path)
        assert kernel_build_dir() == ref
        assert pinned_ninja()[0] != fake
    # what the build depends on does change the key
    monkeypatch.setattr(quant, "_CFLAGS", [*quant._CFLAGS, "-DX"])
    assert kernel_build_dir()[0] != ref[0]


def run_kernel(env: dict) -> subprocess.CompletedProcess:
    code = "from plinth.infer.quant import cpu_kernel; print(cpu_kernel() is not None)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": SRC}, timeout=300)


def test_a_built_kernel_is_reused_whatever_ninja_is_on_path(tmp_path):
    pytest.importorskip("ninja")
    build_dir, _ = kernel_build_dir()
    lib = build_dir / f"{KERNEL_NAME}.so"
    if not lib.exists():
        pytest.skip("the kernel is not built here (the first use builds it, ~1 min)")
    before = lib.stat().st_mtime_ns
    fake = str(fake_ninja(tmp_path / "bin"))
    for path in (fake + os.pathsep + os.environ["PATH"], "/usr/bin:/bin"):
        r = run_kernel({**os.environ, "PATH": path})
        assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
        assert "building" not in r.stderr  # nothing to build
    assert lib.stat().st_mtime_ns == before


def test_a_first_build_says_so(tmp_path):
    """A first build prints one line before it starts (here the compiler is /bin/false, so
    it fails at once and plinth falls back to torch's kernel with a warning)."""
    pytest.importorskip("ninja")
    if quant.torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: the kernel is never built")
    env = {**os.environ, "PLINTH_KERNEL_DIR": str(tmp_path / "k"), "CXX": "/bin/false"}
    r = run_kernel(env)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert "plinth: building the CPU decode kernel (once, about a minute)" in r.stderr
    assert str(tmp_path / "k") in r.stderr
    assert "could not be built" in r.stderr and "Traceback" not in r.stderr


def test_a_build_killed_earlier_does_not_block_the_next(tmp_path):
    """A SIGKILLed build leaves torch's `lock` file behind; torch alone would wait on it forever.
    The next build removes it (under plinth's flock) and goes on (here to the /bin/false
    compiler's failure and torch's fallback kernel)."""
    pytest.importorskip("ninja")
    if quant.torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: the kernel is never built")
    root = tmp_path / "k"
    env = {**os.environ, "PLINTH_KERNEL_DIR": str(root), "CXX": "/bin/false"}
    build_dir = kernel_build_dir()[0]
    stale = root / build_dir.name / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    r = run_kernel(env)  # times out (300 s) without the fix
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert "could not be built" in r.stderr
