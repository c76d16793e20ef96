"""The code sandbox: runaway programs are stopped and scored as failures, quickly."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from plinth.eval.sandbox import run_python, score_code_completion

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def _gone(pid: int) -> bool:
    """True when the process no longer runs (missing, or a zombie awaiting its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_correct_completion_passes_and_wrong_one_fails():
    ok = score_code_completion(PROMPT, "    return a + b\n", TESTS, timeout=5, entry_point="add")
    assert ok.passed and ok.status == "ok" and ok.returncode == 0
    bad = score_code_completion(PROMPT, "    return a - b\n", TESTS, timeout=5, entry_point="add")
    assert not bad.passed and bad.status == "failed" and bad.returncode == 1
    assert "AssertionError" in bad.output and "program.py" in bad.output
    broken = score_code_completion(PROMPT, "    return (a +\n", TESTS, entry_point="add")
    assert broken.status == "failed" and "SyntaxError" in broken.output


def test_infinite_loop_is_killed_at_the_timeout():
    t0 = time.monotonic()
    r = run_python("print('started')\nwhile True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.status == "timeout" and not r.passed
    assert r.output == "started\n"  # written before the kill, kept (unbuffered child)
    assert 1.0 <= r.duration < 2.5 and elapsed < 3.0
    r = run_python("import time\ntime.sleep(60)\n", timeout=0.5)  # idle, not burning CPU
    assert r.status == "timeout" and r.duration < 2.0


@pytest.mark.parametrize(
    "code",
    ["x = [0] * 10**10\n", "x = []\nwhile True:\n    x.append(bytearray(10**7))\n"],
    ids=["huge", "growing"],
)
def test_unbounded_allocation_hits_the_memory_limit(code):
    r = run_python(code, timeout=10.0, memory_mb=256)
    assert r.status == "memory" and not r.passed
    assert "MemoryError" in r.output
    assert r.duration < 5.0  # long before the 10 s timeout


def test_fork_bomb_is_stopped():
    r = run_python("import os\nwhile True:\n    os.fork()\n", timeout=3.0)
    assert not r.passed and r.status == "failed"
    assert "disabled in the plinth sandbox" in r.output and r.duration < 3.0


@pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() == 0, reason="RLIMIT_NPROC does not bind root"
)
def test_unguarded_fork_bomb_is_bounded_by_the_process_limit():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n"
    code += "    except OSError:\n        continue\n"
    r = run_python(code, timeout=1.0, guard=False, max_procs=8)
    assert r.status == "timeout" and r.duration < 5.0


def test_children_left_behind_are_killed():
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
    )
    r = run_python(code, timeout=5.0, guard=False)
    assert r.status == "ok"
    pid = int(r.output.split()[0])
    deadline = time.monotonic() + 2.0
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gone(pid)


def test_output_is_captured_and_truncated():
    r = run_python("import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n")
    assert r.status == "ok" and "hello" in r.output and "oops" in r.output and not r.truncated
    r = run_python("for i in range(100000):\n    print(i)\n", max_output=1000)
    assert r.status == "ok" and r.truncated and len(r.output) <= 1000
    assert r.output.endswith("99999\n")  # the tail is what is kept


def test_fresh_directory_minimal_environment_and_writes_confined(tmp_path, monkeypatch):
    monkeypatch.setenv("PLINTH_SANDBOX_SECRET", "s3cret")
    target = tmp_path / "escaped.txt"
    code = (
        "import os\n"
        "print(os.getcwd())\n"
        "print(sorted(os.listdir('.')))\n"
        "print('PLINTH_SANDBOX_SECRET' in os.environ)\n"
        "open('scratch.txt', 'w').write('fine')\n"
        f"open({str(target)!r}, 'w').write('bad')\n"
    )
    r = run_python(code, files={"data.txt": "x"})
    cwd, listing, secret = r.output.splitlines()[:3]
    assert listing == "['data.txt', 'program.py']" and secret == "False"
    assert not Path(cwd).exists()  # removed afterwards
    assert r.status == "failed" and "outside the sandbox directory" in r.output
    assert not target.exists()


def test_exit_status_decides():
    assert run_python("import sys\nsys.exit(0)\n").passed
    r = run_python("raise SystemExit(3)\n")
    assert r.status == "failed" and r.returncode == 3


@pytest.mark.skipif(sys.platform == "win32", reason="no resource limits on Windows")
def test_resource_limits_are_set_in_the_child():
    code = (
        "import resource as r\n"
        "print(r.getrlimit(r.RLIMIT_AS)[0], r.getrlimit(r.RLIMIT_CORE)[0],"
        " r.getrlimit(r.RLIMIT_CPU)[0])\n"
    )
    r = run_python(code, timeout=3.0, memory_mb=300)
    assert r.output.split() == [str(300 << 20), "0", "4"]
    r = run_python("open('big', 'wb').write(b'x' * (3 << 20))\n", max_file_mb=1)
    assert r.status == "failed" and "File too large" in r.output
    r = run_python("import resource as r\nr.setrlimit(r.RLIMIT_AS, (-1, -1))\n")
    assert r.status == "failed" and "disabled in the plinth sandbox" in r.output


def test_a_program_that_cannot_start_is_an_error(tmp_path):
    r = run_python("pass\n", python=str(tmp_path / "no-such-python"))
    assert r.status == "error" and r.returncode is None and "cannot start" in r.output


def test_builtin_code_task_reference_bodies_pass_and_wrong_ones_fail():
    """The suite's `code` task is scorable: every reference body passes its asserts through the
    task's own scoring (prompt as rendered + completion + tests), and an empty body fails."""
    from plinth.eval.scoring import score_generation
    from plinth.eval.tasks import load_tasks

    task = load_tasks(["code"])[0]
    assert len(task.rows) == 24 and task.generation.metric == "code_exec"
    for row in task.rows:
        assert score_generation(task, row["solution"], row) == {"code_exec": 1.0}, row["prompt"]
    assert score_generation(task, "\n    pass", task.rows[0]) == {"code_exec": 0.0}
    assert task.context(1, 2).count("    return ") == 2  # two worked examples precede the row
