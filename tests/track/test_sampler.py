"""The resource sampler writes real readings from a background thread and stops cleanly."""

from __future__ import annotations

import threading
import time

import pytest

from plinth.track.run import read_jsonl
from plinth.track.sampler import ResourceSampler, compute_hours


def nvml_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


def test_compute_hours():
    assert compute_hours(8, 3600) == 8.0
    assert compute_hours(2, 900) == 0.5
    assert compute_hours(1, -5) == 0.0


def test_one_sample_has_sane_readings():
    sampler = ResourceSampler("unused.jsonl")
    rec = sampler.sample()
    assert rec["rss_mb"] > 10  # this Python process
    assert 0 <= rec["ram_percent"] <= 100
    assert rec["ram_used_mb"] > 0
    assert 0 <= rec["sys_cpu_percent"] <= 100
    assert abs(rec["time"] - time.time()) < 5
    gpu_keys = sorted(k for k in rec if k.startswith("gpu"))
    if nvml_gpus():
        assert "gpu0/mem_mb" in gpu_keys and "gpu0/util" in gpu_keys
    else:
        assert gpu_keys == []  # no NVML or no GPU: CPU and RAM only, no error


def test_background_thread_writes_until_stopped(tmp_path):
    path = tmp_path / "run" / "system.jsonl"
    path.parent.mkdir()
    path.write_text('{"time": 1.0, "cpu_percent": 5.0}\n')  # a resumed run appends
    with ResourceSampler(path, interval=0.05) as sampler:
        assert any(t.name == "plinth-sampler" for t in threading.enumerate())
        end = time.perf_counter() + 0.6
        x = 0
        while time.perf_counter() < end:  # keep this process busy so CPU shows up
            x += 1
    assert not any(t.name == "plinth-sampler" for t in threading.enumerate())
    records = read_jsonl(path)
    assert records[0] == {"time": 1.0, "cpu_percent": 5.0}
    new = records[1:]
    assert len(new) == sampler.samples >= 5
    times = [r["time"] for r in new]
    assert times == sorted(times) and times[-1] - times[0] > 0.3
    assert max(r["cpu_percent"] for r in new) > 20
    sampler.stop()  # idempotent
    assert len(read_jsonl(path)) == len(records)


def test_gpu_indices_filter_unknown_devices(tmp_path):
    sampler = ResourceSampler(tmp_path / "s.jsonl", gpu_indices=[999])
    rec = sampler.sample()
    assert sampler.gpu_count == 0
    assert not any(k.startswith("gpu") for k in rec)


@pytest.mark.gpu
def test_gpu_readings_present_on_a_gpu_machine(tmp_path):
    if not nvml_gpus():
        pytest.skip("no NVIDIA GPU visible through NVML")
    rec = ResourceSampler(tmp_path / "s.jsonl").sample()
    assert rec["gpu0/mem_total_mb"] > 1000 and 0 <= rec["gpu0/util"] <= 100
