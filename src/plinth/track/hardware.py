"""What the hardware can do: peak FLOP/s for MFU, and memory in use.

On GPUs the peak comes from a table of datasheet numbers (dense, no sparsity); on a CPU there
is no honest datasheet number, so plinth measures the fp32 matmul peak of this machine once per
process (a fraction of a second) and MFU is reported against that.
"""

from __future__ import annotations

import functools
import time

import torch

# key -> (fragment of torch.cuda.get_device_name(), dense bf16 peak FLOP/s, memory bytes).
# Checked in order, so a longer name (L40S) comes before its prefix (L4).
GPUS: dict[str, tuple[str, float, float]] = {
    "h200": ("H200", 989e12, 141e9),
    "h100": ("H100", 989e12, 80e9),
    "a100": ("A100", 312e12, 80e9),
    "a100-40gb": ("A100-SXM4-40GB", 312e12, 40e9),
    "l40s": ("L40S", 362e12, 48e9),
    "l4": ("L4", 121e12, 24e9),
    "a10g": ("A10G", 125e12, 24e9),
    "rtx4090": ("RTX 4090", 165e12, 24e9),
    "rtx3090": ("RTX 3090", 71e12, 24e9),
    "v100": ("V100", 125e12, 32e9),
    "t4": ("T4", 65e12, 16e9),
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
        for fragment, peak, _ in GPUS.values():
            if fragment in name:
                return peak
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
