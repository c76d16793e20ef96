"""Every command of README.md's "A short tour" runs as written and exits 0 (issue 16).

The commands are read from the README itself and run by bash as real processes, in a fresh
working directory that holds the repository's `configs/` and `examples/` (so relative paths
resolve as they do from the repository root) and nothing else: every file a command needs is
one the tour made before it. `plinth` and `torchrun` on PATH start this interpreter with this
checkout's source. Where a command trains, tiny overrides are appended (the issue allows it); the
8-GPU torchrun line runs with 2 CPU processes (gloo); `serve` gets a free port and is asked for
/v1/models; `chat` gets one line and end of input. Nothing else is changed.

    python -m pytest tests/recipes/test_readme_tour.py -q             # the fast lines
    python -m pytest tests/recipes/test_readme_tour.py -q -m slow -s  # the whole tour, timed
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- the tour, parsed


def tour_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The tour block's commands: continuation lines joined, comments and blank lines dropped,
    each re-quoted for bash (globs such as configs/*.yaml stay unquoted, as written)."""
    text = readme.read_text(encoding="utf-8")
    m = re.search(r"^## A short tour\n+```bash\n(.*?)^```", text, re.S | re.M)
    assert m, "README.md has no '## A short tour' bash block"
    out: list[str] = []
    pending = ""
    for line in m.group(1).splitlines():
        code = pending + line
        if code.rstrip().endswith("\\"):
            pending = code.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(code, comments=True)
        if words:
            out.append(" ".join(w if re.fullmatch(r"[\w./*=:,@%+-]+", w) else shlex.quote(w)
                                for w in words))
    return out


# tiny sizes for the quickstart recipe; every quickstart-config command gets the same ones so
# they share one prepared dataset, as the tour's full-size commands do
QS_TINY = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=512",
    "data.max_docs=60", "pretrain.max_steps=4", "optim.warmup_steps=1",
    "tracking.eval_every=2", "tracking.checkpoint_every=2", "tracking.sample_every=2",
    "tracking.eval_batches=2",
]
# the 7B FSDP line, at toy size on 2 CPU processes: its batch settings stay as written
TORCHRUN_TINY = [
    "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2",
    "model.d_ff=64", "model.vocab_size=512", "model.max_seq_len=32", "data.max_docs=60",
    "pretrain.max_steps=2", "hardware.device=cpu", "hardware.precision=fp32",
    "tracking.eval_every=2", "tracking.eval_batches=2", "tracking.checkpoint_every=2",
    "tracking.sample_every=2",
]
FT_TINY = ["finetune.max_steps=2", "tracking.eval_every=1000", "tracking.sample_every=1000"]

# (command prefix, what is appended, how it runs); every tour command must match one
RULES: list[tuple[str, list[str], str]] = [
    ("plinth quickstart", QS_TINY, "run"),
    ("plinth data prepare configs/quickstart.yaml", QS_TINY, "run"),
    ("plinth data tokenizer train configs/quickstart.yaml", QS_TINY, "run"),
    ("plinth pretrain configs/quickstart.yaml", QS_TINY, "run"),
    ("torchrun ", TORCHRUN_TINY, "torchrun"),
    ("plinth finetune ", FT_TINY, "run"),
    ("plinth align ", [*FT_TINY, "tracking.eval_batches=1"], "run"),
    ("plinth serve ", [], "serve"),
    ("plinth chat ", [], "chat"),
    ("plinth", [], "run"),
]
# lines that need nothing the tour trains (a tiny prepared dataset stands in for data/quickstart)
FAST = ("plinth --help", "plinth config ", "plinth plan ", "plinth data inspect ")


def rule(cmd: str) -> tuple[list[str], str]:
    for prefix, extra, kind in RULES:
        if cmd.startswith(prefix):
            return extra, kind
    raise AssertionError(f"no rule for tour command {cmd!r}: add one to RULES")


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> dict[str, str]:
    """PATH with `plinth` and `torchrun` starting this interpreter on this checkout's source."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, module in (("plinth", "plinth"), ("torchrun", "torch.distributed.run")):
        p = bin_dir / name
        p.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        p.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO / "src"),
        "COLUMNS": "200",
    }


def workdir(root: Path) -> Path:
    """A fresh directory with the repository's configs/ and examples/, as from the repo root."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "examples"):
        (root / name).symlink_to(REPO / name)
    return root


def run(cmd: str, cwd: Path, env: dict, timeout: float = 1800, **kw):
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)
    return proc, time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(cmd: str, cwd: Path, env: dict, timeout: float = 600):
    """Start the server, wait for /v1/models to answer, stop it; (returncode-like, text)."""
    port = _free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd} --port {port}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answer = None
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    answer = json.load(r)
                break
            except OSError:
                time.sleep(1)
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    ok = bool(answer and answer.get("data"))
    return (0 if ok else 1), f"{out}\n/v1/models -> {answer}", time.perf_counter() - t0


def tour_line(cmd: str, cwd: Path, env: dict) -> tuple[str, int, float, str]:
    """Run one tour command the way the tour does; (command run, exit code, seconds, output)."""
    extra, kind = rule(cmd)
    if kind == "torchrun":
        cmd = cmd.replace("--nproc_per_node=8", "--nproc_per_node=2")
        env = {**env, "OMP_NUM_THREADS": "1"}
    if extra:
        cmd = f"{cmd} {' '.join(extra)}"
    if kind == "serve":
        code, out, dt = serve_and_ask(cmd, cwd, env)
        return cmd, code, dt, out
    proc, dt = run(cmd, cwd, env, input="Name one colour.\n" if kind == "chat" else None)
    return cmd, proc.returncode, dt, proc.stdout + proc.stderr


def assert_ok(cmd: str, code: int, out: str) -> None:
    assert code == 0 and "Traceback" not in out, f"{cmd}\nexit {code}\n{out[-4000:]}"


# --------------------------------------------------------------------------- tests


def test_every_tour_command_is_covered_and_points_at_shipped_files():
    cmds = tour_commands()
    assert len(cmds) >= 30 and cmds[0] == "plinth --help"
    for cmd in cmds:
        rule(cmd)
        for word in shlex.split(cmd):  # files the tour reads ship with the repository
            if word.startswith(("configs/", "examples/")) and "*" not in word:
                assert (REPO / word).is_file(), f"{cmd}: {word} does not exist"
    # the compared runs are ones the tour makes
    compare = next(c for c in cmds if c.startswith("plinth compare "))
    names = {Path(w).name for w in compare.split()[2:]}
    made = {"quickstart"} | {
        m.group(1) for c in cmds for m in [re.search(r"tracking\.run_name=(\S+)", c)] if m
    }
    assert names <= made, (names, made)


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory, tiny_data_dir):
    d = workdir(tmp_path_factory.mktemp("tour-fast") / "repo")
    (d / "data").mkdir()
    (d / "data" / "quickstart").symlink_to(tiny_data_dir)
    return d


@pytest.mark.parametrize("cmd", [c for c in tour_commands() if c.startswith(FAST)])
def test_fast_tour_line(cmd, fast_dir, shims):
    cmd, code, _, out = tour_line(cmd, fast_dir, shims)
    assert_ok(cmd, code, out)
    if cmd.startswith("plinth plan "):  # the shipped plan line fits, with the batch it states
        assert "will not fit" not in out and "warning: global batch" not in out
    if "config schema --output" in cmd:
        json.loads((fast_dir / cmd.split("--output ")[1].split()[0]).read_text())


def _has_reference(name: str) -> bool:
    from plinth.errors import UsageError
    from plinth.hf.importer import reference_path

    try:
        reference_path(name)
    except UsageError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(7200)  # about 25 min on 2 busy cores, ref-smollm2's suite the longest
def test_the_whole_tour_runs_as_written(tmp_path, shims):
    """The tour top to bottom in one fresh directory; prints each line's exit code and time.
    Lines on a reference model whose package is not installed are skipped, not failed."""
    cwd = workdir(tmp_path / "repo")
    missing = [r for r in ("ref-smollm2", "ref-minilm") if not _has_reference(r)]
    uses = {"ref-smollm2": ("ref-smollm2", "sft-smollm2"), "ref-minilm": ("ref-minilm", "minilm")}
    results, failures = [], []
    for cmd in tour_commands():
        if any(k in cmd for r in missing for k in uses[r]):
            results.append(("skip", 0.0, cmd))
            continue
        print(f"\n$ {cmd}", flush=True)
        ran, code, dt, out = tour_line(cmd, cwd, shims)
        results.append((code, dt, ran))
        print(f"  -> exit {code} in {dt:.1f} s", flush=True)
        if code != 0 or "Traceback" in out:
            failures.append(f"{ran}\nexit {code}\n{out[-3000:]}")
        if cmd == "plinth quickstart" and code == 0:  # its suggested next command works too
            nxt = re.search(r"Next: (plinth generate [^|]*?)\s+\|", out)
            assert nxt, out[-2000:]
            ran, code, dt, out = tour_line(nxt.group(1), cwd, shims)
            results.append((code, dt, f"{ran}   (quickstart's suggestion)"))
            if code != 0 or "Traceback" in out:
                failures.append(f"{ran}\nexit {code}\n{out[-3000:]}")
    print("\nexit   seconds  command")
    for code, dt, cmd in results:
        print(f"{code!s:>4} {dt:9.1f}  {cmd}")
    assert not failures, "\n\n".join(failures)
    if missing:
        pytest.skip(f"tour lines on {missing} not run: their packages are not installed")
