"""Resource sampler: a background thread writing CPU, RAM and GPU readings to system.jsonl.

    with ResourceSampler(run.path / "system.jsonl", interval=10):
        train(...)

Each record: `time`, `cpu_percent` (this process, 100 = one core), `sys_cpu_percent` (whole
machine, 0-100), `rss_mb` (this process), `ram_used_mb` / `ram_percent` (machine), and for every
visible NVIDIA GPU `gpu{i}/util` (%), `gpu{i}/mem_mb`, `gpu{i}/mem_total_mb`, `gpu{i}/power_w`,
`gpu{i}/temp_c`, read through NVML (`nvidia-ml-py`, in the `track` extra) when it and a driver
are present; without them the GPU keys are simply absent. A reading NVML refuses (e.g. power on
some boards) is left out rather than failing the sampler.

The thread wakes every `interval` seconds, so its cost is a few system calls per interval and
nothing on the training step. Run it on rank 0 (one per node if you want every node's GPUs).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from plinth.track.run import JsonlWriter


def compute_hours(devices: int, wall_seconds: float) -> float:
    """Device-hours spent: devices x wall time (what a GPU cluster bills)."""
    return max(devices, 0) * max(wall_seconds, 0.0) / 3600.0


class _Nvml:
    """The NVML handles of the visible GPUs, or none when NVML or the driver is missing."""

    def __init__(self, indices: list[int] | None = None):
        self.handles: list[tuple[int, Any]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no package, no driver, no GPU: sample CPU and RAM only
            self.nvml = None
            return
        self.nvml = pynvml
        count = pynvml.nvmlDeviceGetCount()
        for i in indices if indices is not None else range(count):
            if 0 <= i < count:
                self.handles.append((i, pynvml.nvmlDeviceGetHandleByIndex(i)))

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        nv = self.nvml
        for i, h in self.handles:
            for key, fn in (
                ("util", lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                ("mem_mb", lambda h: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20),
                ("mem_total_mb", lambda h: nv.nvmlDeviceGetMemoryInfo(h).total / 2**20),
                ("power_w", lambda h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
                ("temp_c", lambda h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            ):
                with contextlib.suppress(Exception):  # not supported on this board
                    out[f"gpu{i}/{key}"] = float(fn(h))
        return out

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()


class ResourceSampler:
    """Samples resources every `interval` seconds into a JSONL file until `stop()`."""

    def __init__(
        self, path: str | Path, interval: float = 10.0, gpu_indices: list[int] | None = None
    ):
        import psutil

        self.path = Path(path)
        self.interval = interval
        self._gpu_indices = gpu_indices
        self._process = psutil.Process(os.getpid())
        self._psutil = psutil
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: JsonlWriter | None = None
        self._nvml: _Nvml | None = None
        self.samples = 0

    @property
    def gpu_count(self) -> int:
        return len(self._nvml.handles) if self._nvml else 0

    def sample(self) -> dict[str, Any]:
        """One reading (also what the thread writes)."""
        if self._nvml is None:
            self._nvml = _Nvml(self._gpu_indices)
            self._process.cpu_percent(None)  # the first call only starts the measurement
            self._psutil.cpu_percent(None)
        vm = self._psutil.virtual_memory()
        record: dict[str, Any] = {
            "time": time.time(),
            "cpu_percent": self._process.cpu_percent(None),
            "sys_cpu_percent": self._psutil.cpu_percent(None),
            "rss_mb": self._process.memory_info().rss / 2**20,
            "ram_used_mb": (vm.total - vm.available) / 2**20,
            "ram_percent": vm.percent,
        }
        record.update(self._nvml.read())
        return record

    def start(self) -> ResourceSampler:
        if self._thread is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = JsonlWriter(self.path)
        self.sample()  # prime cpu_percent so the first written value is meaningful
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="plinth-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
        self._write()  # a last reading at stop

    def _write(self) -> None:
        try:
            record = self.sample()
        except Exception:  # a failed reading must not kill the thread or the run
            return
        if self._writer is not None:
            self._writer.write(record)
            self.samples += 1

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.interval))
        self._thread = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
