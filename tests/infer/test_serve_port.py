"""`plinth serve --port`: out of range, or in use (a real bound socket), is bad input (exit 2, a
message naming the port and the fix, no traceback) found before the banner; 0 picks a free
port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from plinth.errors import UsageError
from plinth.recipes.serve import bind

SRC = str(Path(__file__).resolve().parents[2] / "src")


def plinth(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "plinth", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("port", ["-1", "65536", "99999"])
def test_port_out_of_range_is_exit_2_naming_the_port(port, tiny_hf):
    r = plinth("serve", str(tiny_hf[1]), "--port", port)
    assert r.returncode == 2, r.stderr
    assert f"--port {port}" in r.stderr and "1-65535" in r.stderr
    assert "Traceback" not in r.stderr and "plinth serve:" not in r.stdout


def test_port_in_use_fails_before_the_banner(tiny_hf):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = plinth("serve", str(tiny_hf[1]), "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert f"Port {port}" in r.stderr and "already in use" in r.stderr
    assert "--port N" in r.stderr  # the fix
    assert "Traceback" not in r.stderr
    assert "plinth serve:" not in r.stdout  # no banner for a server that cannot listen


def test_bind_checks_in_process():
    sock = bind("127.0.0.1", 0)  # 0: any free port
    try:
        assert sock.getsockname()[1] > 0
        with pytest.raises(UsageError, match="already in use"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
    for bad in (-5, 70000, True):
        with pytest.raises(UsageError, match="1-65535"):
            bind("127.0.0.1", bad)
    with pytest.raises(UsageError, match="--host"):
        bind("no such host.invalid", 8000)
