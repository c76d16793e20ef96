"""Who is writing a run, and is it still alive: `RUN/writer.json`.

    {"pid": 4242, "host": "node-3", "boot_id": "…", "pid_start": 8123456,
     "started": 1733200000.0, "heartbeat": 1733200930.5, "interval_s": 30.0,
     "exit": "killed", "closed": 1733200931.0}

The process that opens a run for writing (`RunDir`) writes this file and a daemon thread
rewrites it every `interval_s` seconds (one small atomic file replace: nothing on the training
step). `exit`/`closed` are added when the writer ends on purpose (`exit` is how the training
call ended: finished, killed, failed, halted). A resume rewrites the file for the new process.

`writer_alive` decides whether a writer that has not closed is still there:

- on the same machine (same host name and boot id): its pid exists and is the same process
  (the process start time in /proc matches, so a reused pid is not mistaken for it);
- elsewhere: its heartbeat is younger than `STALE_AFTER_S` (10 missed beats; a bound that
  also absorbs modest clock skew between hosts).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

WRITER_FILE = "writer.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 10 * HEARTBEAT_S


def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process `pid`, from /proc; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _write(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a full or vanished disk must not end the run; the records still flush
        pass


class Heartbeat:
    """Writes `writer.json` for this process and keeps its heartbeat fresh until `close()`."""

    def __init__(self, run_path: Path, interval: float = HEARTBEAT_S):
        self.path = Path(run_path) / WRITER_FILE
        self.interval = interval
        now = time.time()
        pid = os.getpid()
        self.record: dict[str, Any] = {
            "pid": pid,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid_start": _proc_start(pid),
            "started": now,
            "heartbeat": now,
            "interval_s": interval,
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        _write(self.path, self.record)
        self._thread = threading.Thread(target=self._run, name="plinth-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def beat(self, **extra: Any) -> None:
        with self._lock:
            if "closed" in self.record:
                return
            self.record.update(extra, heartbeat=time.time())
            _write(self.path, self.record)

    def set_exit(self, status: str) -> None:
        """How the writer's training call ended (finished, killed, failed, halted)."""
        self.beat(exit=str(status))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if "closed" not in self.record:
                now = time.time()
                self.record.update(heartbeat=now, closed=now)
                _write(self.path, self.record)


def read_writer(run_path: Path) -> dict:
    """The run's writer record; {} when there is none or it cannot be read."""
    try:
        data = json.loads((Path(run_path) / WRITER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _num(x: Any) -> float | None:
    ok = isinstance(x, int | float) and not isinstance(x, bool)
    return float(x) if ok else None


def writer_alive(record: dict, now: float | None = None) -> bool | None:
    """True when the (unclosed) writer is still running, False when it is gone, None when the
    record cannot tell (absent or malformed: the caller falls back to record times)."""
    if not record or "closed" in record:
        return None if not record else False
    pid, beat = record.get("pid"), _num(record.get("heartbeat"))
    same_boot = record.get("boot_id") is None or _boot_id() is None or (
        record.get("boot_id") == _boot_id()
    )
    local = record.get("host") == socket.gethostname() and same_boot
    if local and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        if not _pid_exists(pid):
            return False
        started = record.get("pid_start")
        now_start = _proc_start(pid)
        return not (isinstance(started, int) and now_start is not None and now_start != started)
    if beat is None:
        return None
    now = time.time() if now is None else now
    return now - beat <= STALE_AFTER_S
