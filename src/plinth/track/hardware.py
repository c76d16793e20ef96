"""What the hardware can do: peak FLOP/s for MFU, and memory in use.

On GPUs the peak comes from a table of datasheet numbers (dense, no sparsity); on a CPU there
is no honest datasheet number, so plinth measures the fp32 matmul peak of this machine once per
process (a fraction of a second) and MFU is reported against that.
"""

from __future__ import annotations

import functools
import time

import torch

# dense bf16/fp16 tensor-core peak FLOP/s by device-name fragment
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


@functools.lru_cache(maxsize=4)
def measure_matmul_peak(device: str = "cpu", size: int = 1024, dtype=torch.float32) -> float:
    """Best FLOP/s of square matmuls on this device (median of repeats would understate it)."""
    g = torch.Generator(device=device).manual_seed(0)  # never touch the training RNG
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(8):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s used as the MFU denominator (datasheet on known GPUs, measured on CPU)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return measure_matmul_peak(str(device), 4096, torch.bfloat16)
    if device.type == "cpu":
        return measure_matmul_peak("cpu")
    return None


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20
