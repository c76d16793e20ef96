"""Run untrusted generated Python (a code-completion answer plus its unit tests) in a child
process with time, memory and process limits, and score it by its exit status.

    python -c "from plinth.eval.sandbox import run_python; print(run_python('print(1 + 1)'))"

What one run does:

- writes the program into a fresh temporary working directory (deleted afterwards, also after a
  timeout) and starts `python -I -B -u` there (unbuffered, so output written before a kill is
  kept and stdout/stderr interleave as written): isolated mode ignores PYTHON* variables, the user's
  site-packages and the current directory; the environment is minimal (PATH, LANG, HOME and
  TMPDIR pointing at the working directory, one BLAS/OpenMP thread), stdin is /dev/null;
- sets resource limits with `resource.setrlimit` in the child, as the first thing its
  interpreter does, before the program is even read (POSIX only): address space (`memory_mb`,
  so an unbounded allocation raises MemoryError instead of swapping the machine), CPU seconds,
  no core files, a cap on the size of any file written, on open files and, for non-root
  users, on the number of processes (the user's current count plus `max_procs`). Not in a
  `preexec_fn`: that runs Python between fork and exec, which can deadlock when the parent has
  threads (torch's and the tokenizer's pools);
- puts the child in its own session / process group; at the wall-clock deadline, and always
  when the program ends, the whole group is killed with SIGKILL (no orphans left spinning);
- captures stdout and stderr together through a pipe read as it arrives, keeping only the last
  `max_output` bytes, so a program printing gigabytes costs no memory here;
- unless `guard=False`, runs the program under a Python-level guard (the approach of OpenAI's
  human-eval `reliability_guard`): creating, replacing or signalling processes (fork, exec,
  subprocess, os.system, kill, setsid), raising resource limits, and deleting, renaming,
  chmod-ing or opening-for-write any path outside the working directory raise PermissionError.
  This is what stops a fork bomb when plinth runs as root, where RLIMIT_NPROC does not apply.

Statuses: `ok` (exit 0), `failed` (non-zero exit: assertion, exception, syntax error, killed by
a signal such as SIGXFSZ), `timeout` (wall-clock deadline or CPU limit), `memory` (MemoryError,
i.e. the address-space limit), `error` (the sandbox could not start the program at all).

What it does NOT protect against. This is a seatbelt for buggy model output, not a security
boundary like a container, VM, gVisor or seccomp profile:
- the network is reachable (sockets are not blocked);
- the whole filesystem can be READ with the permissions of the user running plinth;
- the Python-level guard can be bypassed by determined code (ctypes calling libc, `dir_fd`
  tricks, re-importing C modules), and as root nothing else limits the number of processes;
- shared-memory, /tmp of other processes, signals from C code and kernel bugs are out of scope;
- on macOS RLIMIT_AS is not enforced, and on Windows no limits apply except the timeout.
Run evaluations of untrusted models inside a container or VM without credentials.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATUSES = ("ok", "failed", "timeout", "memory", "error")
PROGRAM = "program.py"
_MEMORY_EXIT = 121  # the bootstrap's exit status for an uncaught MemoryError


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. `passed` is True exactly when `status == "ok"`."""

    passed: bool
    status: str  # ok | failed | timeout | memory | error
    returncode: int | None  # None when the program never started; negative: killed by signal
    duration: float  # wall-clock seconds from start to the end of the kill/cleanup
    output: str  # the last `max_output` bytes of stdout and stderr, interleaved as written
    truncated: bool = False  # True when earlier output was dropped

    def to_dict(self) -> dict:
        return asdict(self)


# The guard and runner executed by the child before the program. It reads the program, then
# disables process control and writes outside the working directory, then executes the program
# as __main__ with its own file name (tracebacks point at program.py lines).
_BOOTSTRAP = r"""
import builtins, io, json, os, sys, traceback
_path = sys.argv[1]
try:
    import resource
except ImportError:
    resource = None
for _name, _soft, _hard in json.loads(sys.argv[3]) if resource else ():
    _key = getattr(resource, _name, None)
    if _key is None:
        continue
    try:
        _cur = resource.getrlimit(_key)[1]
        if _cur != resource.RLIM_INFINITY:
            _hard = min(_hard, _cur)
            _soft = min(_soft, _hard)
        resource.setrlimit(_key, (_soft, _hard))
    except (ValueError, OSError):
        pass  # a limit the platform refuses is skipped, the others still apply
with open(_path, encoding="utf-8") as _f:
    _src = _f.read()
if sys.argv[2] == "1":
    _root = os.path.realpath(os.getcwd()) + os.sep
    def _deny(name):
        def f(*a, **k):
            raise PermissionError(f"{name} is disabled in the plinth sandbox")
        return f
    def _inside(p):
        try:
            p = os.fspath(p)
        except TypeError:
            return True  # a file descriptor: already open
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        return (os.path.realpath(p) + os.sep).startswith(_root)
    def _paths(name, fn, n=1):
        def f(*a, **k):
            if not all(_inside(x) for x in a[:n]):
                raise PermissionError(f"{name} outside the sandbox directory is disabled")
            return fn(*a, **k)
        return f
    import subprocess, shutil
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = _deny("fork_exec")
    except ImportError:
        pass
    for _n in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill",
               "killpg", "setsid", "setpgid", "setpgrp", "setuid", "setgid", "chroot",
               *[n for n in dir(os) if n.startswith(("exec", "spawn"))]):
        if hasattr(os, _n):
            setattr(os, _n, _deny("os." + _n))
    for _n in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "chown",
               "lchown", "mkdir", "makedirs", "symlink", "link"):
        if hasattr(os, _n):
            setattr(os, _n, _paths("os." + _n, getattr(os, _n)))
    for _n in ("rename", "renames", "replace"):
        setattr(os, _n, _paths("os." + _n, getattr(os, _n), 2))
    shutil.rmtree = _paths("shutil.rmtree", shutil.rmtree)
    shutil.move = _paths("shutil.move", shutil.move, 2)
    subprocess.Popen = _deny("subprocess.Popen")
    if resource is not None:
        resource.setrlimit = _deny("resource.setrlimit")
        resource.prlimit = _deny("resource.prlimit")
    _open, _os_open = builtins.open, os.open
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def _guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not _inside(file):
            raise PermissionError(f"writing {file!r} outside the sandbox directory is disabled")
        return _open(file, mode, *a, **k)
    def _guarded_os_open(path, flags, *a, **k):
        if flags & _W and not _inside(path):
            raise PermissionError(f"writing {path!r} outside the sandbox directory is disabled")
        return _os_open(path, flags, *a, **k)
    builtins.open = io.open = _guarded_open
    os.open = _guarded_os_open
_g = {"__name__": "__main__", "__file__": _path, "__builtins__": builtins}
try:
    exec(compile(_src, _path, "exec"), _g)
except MemoryError:
    try:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(MEMORY_EXIT)
""".replace("MEMORY_EXIT", str(_MEMORY_EXIT))


def run_python(
    code: str,
    timeout: float = 10.0,
    memory_mb: int = 512,
    max_output: int = 64_000,
    max_file_mb: int = 64,
    max_procs: int = 16,
    guard: bool = True,
    files: dict[str, str] | None = None,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python program in a fresh temporary directory with limits.

    timeout: wall-clock seconds (also bounds CPU seconds). memory_mb: address-space limit.
    max_output: bytes of combined stdout/stderr kept (the tail). max_file_mb: largest file
    the program may write. max_procs: processes it may add (non-root only). guard: the
    Python-level guard described in the module doc. files: extra files written into the
    working directory first (name -> text). python: interpreter (default: this one)."""
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="plinth-sandbox-"))
    try:
        (workdir / PROGRAM).write_text(code, encoding="utf-8")
        for name, text in (files or {}).items():
            p = (workdir / name).resolve()
            if workdir.resolve() not in p.parents:
                raise ValueError(f"sandbox file name {name!r} leaves the working directory")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text, encoding="utf-8")
        cmd = [python or sys.executable, "-I", "-B", "-u", "-c", _BOOTSTRAP, PROGRAM]
        limits = _limits(timeout, memory_mb, max_file_mb, max_procs)
        return _run([*cmd, str(int(guard)), limits], workdir, timeout, max_output, t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def score_code_completion(
    prompt: str,
    completion: str,
    tests: str,
    timeout: float = 10.0,
    entry_point: str | None = None,
    **limits,
) -> SandboxResult:
    """Run program = prompt + completion + tests; it passes when it exits with status 0.

    `entry_point` follows HumanEval's layout, where `tests` defines `check(candidate)`: when
    given, `check(<entry_point>)` is appended. Other keyword arguments go to `run_python`."""
    program = prompt + completion
    if not program.endswith("\n"):
        program += "\n"
    program += "\n" + tests
    if entry_point:
        program += f"\n\ncheck({entry_point})\n"
    return run_python(program, timeout=timeout, **limits)


# ------------------------------------------------------------------------------- internals


def _env(workdir: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
    }
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"  # thread pools reserve address space per thread
    if sys.platform == "win32":  # Python needs these to start on Windows
        env.update({k: os.environ[k] for k in ("SYSTEMROOT", "TEMP") if k in os.environ})
    return env


def _user_processes() -> int:
    """Processes of this real user (RLIMIT_NPROC counts them all, not only our children)."""
    uid, n = os.getuid(), 0
    try:
        for d in os.scandir("/proc"):
            if d.name.isdigit():
                with contextlib.suppress(OSError):
                    n += d.stat().st_uid == uid
    except OSError:
        return 0
    return n


def _limits(timeout: float, memory_mb: int, max_file_mb: int, max_procs: int) -> str:
    """The limits the child sets on itself: JSON [[RLIMIT name, soft, hard], ...]."""
    cpu = max(1, math.ceil(timeout)) + 1
    limits = [
        ["RLIMIT_AS", memory_mb << 20, memory_mb << 20],
        ["RLIMIT_CPU", cpu, cpu + 1],  # SIGXCPU, then SIGKILL
        ["RLIMIT_CORE", 0, 0],
        ["RLIMIT_FSIZE", max_file_mb << 20, max_file_mb << 20],
        ["RLIMIT_NOFILE", 256, 256],
    ]
    if hasattr(os, "getuid") and os.getuid() != 0:  # root is not bound by RLIMIT_NPROC
        nproc = _user_processes() + max_procs
        limits.append(["RLIMIT_NPROC", nproc, nproc])
    return json.dumps(limits)


def _kill_group(proc: subprocess.Popen) -> None:
    if sys.platform == "win32":
        proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(cmd, workdir, timeout, max_output, t0):
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=sys.platform != "win32",
        )
    except (OSError, subprocess.SubprocessError) as e:
        return SandboxResult(False, "error", None, time.monotonic() - t0, f"cannot start: {e}")
    deadline = time.monotonic() + timeout
    buf = bytearray()
    dropped = eof = timed_out = False
    fd = proc.stdout
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    drain_until = None  # after the main process exits, leftover output gets a short grace
    try:
        while True:
            now = time.monotonic()
            if drain_until is None and proc.poll() is not None:
                _kill_group(proc)  # children it left behind
                drain_until = now + 0.5
            if eof and drain_until is not None:
                break
            limit = drain_until if drain_until is not None else deadline
            if now >= limit:
                timed_out = drain_until is None
                break
            if eof:  # output closed but the program still runs
                time.sleep(min(0.02, limit - now))
                continue
            if not sel.select(timeout=min(0.05, limit - now)):
                continue
            chunk = os.read(fd.fileno(), 1 << 16)
            if not chunk:
                eof = True
                continue
            buf += chunk
            if len(buf) > 2 * max_output:
                del buf[: len(buf) - max_output]
                dropped = True
    finally:
        sel.close()
        _kill_group(proc)
        fd.close()
        rc = proc.wait()
    if len(buf) > max_output:
        del buf[: len(buf) - max_output]
        dropped = True
    out = buf.decode("utf-8", "replace")
    duration = time.monotonic() - t0
    xcpu = getattr(signal, "SIGXCPU", None)
    # the group is only killed at the deadline or after the program ended, so a program killed
    # by SIGXCPU/SIGKILL otherwise hit its CPU-seconds limit
    if timed_out or rc == -signal.SIGKILL or (xcpu is not None and rc == -xcpu):
        status = "timeout"
    elif rc == _MEMORY_EXIT or (rc != 0 and re.search(r"^MemoryError\b", out, re.M)):
        status = "memory"
    elif rc == 0:
        status = "ok"
    else:
        status = "failed"
    return SandboxResult(status == "ok", status, rc, duration, out, dropped)
