"""The run directory: the single source of truth that reports and comparisons read.

    runs/<name>/config.yaml  manifest.json  metrics.jsonl  events.jsonl  samples.jsonl
                writer.json  evals.jsonl  checkpoints/step_XXXXXXX/

`writer.json` says which process writes the run and when it was last alive (see
plinth.track.writer). `evals.jsonl` holds results of `plinth eval` on the run's checkpoints:
kept apart from events.jsonl so that evaluating later never changes the training timeline
(wall time, compute, status).

JSON lines are appended and flushed as written, so a killed run loses at most the record being
written. JSON has no NaN/Infinity, so non-finite floats are written as the strings "NaN",
"Infinity" and "-Infinity" and `read_jsonl` turns them back into floats: never dropped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode(value: Any) -> Any:
    """Make a value JSON-safe: non-finite floats become explicit strings, tensors plain numbers."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        return encode(value.item())
    return value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (killed writer) is skipped."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(decode(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return records


class JsonlWriter:
    """Append-only JSON lines, flushed after every record."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(encode(record), allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class RunPaths:
    """Where a run lives, without writing anything: what ranks other than 0 get."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def close(self) -> None:
        pass


class RunDir:
    """Writes one run directory; only rank 0 creates one (the others get `RunPaths`).

    `heartbeat` (default) records this process as the run's writer in writer.json and keeps
    that fresh from a daemon thread, so a killed writer is told apart from a running one."""

    def __init__(self, path: str | Path, *, heartbeat: bool = True):
        from plinth.track.writer import Heartbeat

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)
        self.metrics = JsonlWriter(self.path / "metrics.jsonl")
        self.events = JsonlWriter(self.path / "events.jsonl")
        self.samples = JsonlWriter(self.path / "samples.jsonl")
        self.heartbeat = Heartbeat(self.path) if heartbeat else None

    def log_metrics(self, step: int, **values: Any) -> None:
        self.metrics.write({"step": step, "time": time.time(), **values})

    def log_event(self, step: int, kind: str, **details: Any) -> None:
        self.events.write({"step": step, "time": time.time(), "event": kind, **details})

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        self.samples.write({"step": step, "time": time.time(), "prompt": prompt, "text": text})

    def write_config(self, yaml_text: str) -> None:
        _atomic_write(self.path / "config.yaml", yaml_text)

    def write_manifest(self, manifest: dict) -> None:
        _atomic_write(self.path / "manifest.json", json.dumps(encode(manifest), indent=2) + "\n")

    def set_exit(self, status: str) -> None:
        """Record how the writer's training call ended (finished, killed, failed, halted)."""
        if self.heartbeat is not None:
            self.heartbeat.set_exit(status)

    def close(self) -> None:
        for w in (self.metrics, self.events, self.samples):
            w.close()
        if self.heartbeat is not None:
            self.heartbeat.close()


EVALS_FILE = "evals.jsonl"


def append_evals(run_path: str | Path, records: list[dict]) -> Path:
    """Append evaluation results (`plinth eval` on a run) to RUN/evals.jsonl, never to the
    training events: evaluating a run later must not change its timeline."""
    path = Path(run_path) / EVALS_FILE
    writer = JsonlWriter(path)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def unique_run_path(output_dir: str | Path, name: str) -> Path:
    """output_dir/name, or name-2, name-3... when that run already exists (never overwrite)."""
    base = Path(output_dir) / name
    if not base.exists():
        return base
    n = 2
    while (base.parent / f"{name}-{n}").exists():
        n += 1
    return base.parent / f"{name}-{n}"


def git_info(cwd: str | Path | None = None) -> dict:
    """Git SHA, dirty flag and diff of the working tree (empty when not in a git checkout)."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None, "diff": None}
    return {"sha": sha, "dirty": bool(diff.strip()), "diff": diff[:200_000]}


def build_manifest(
    *,
    seed: int,
    world_size: int,
    device: str,
    data: dict | None = None,
    distributed: dict | None = None,
    **extra,
) -> dict:
    """What a run was made of: code version, command line, packages, hardware, data (and any
    `extra` sections, e.g. a fine-tune's base model)."""
    import torch

    packages = {}
    for name in ("plinth", "torch", "numpy", "tokenizers", "safetensors", "pydantic"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    hardware = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }
    return {
        "created": time.time(),
        "git": git_info(Path(__file__).resolve().parent),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "packages": packages,
        "hardware": hardware,
        "world_size": world_size,
        "distributed": distributed or {"strategy": "none"},
        "seed": seed,
        "data": data or {},
        **extra,
    }
