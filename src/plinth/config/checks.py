"""Checks that depend on the machine or the recipe, kept apart from the pure schema.

The schema validates a config anywhere; these say what will happen on *this* machine (bf16 on
a CPU without native bf16, a GPU that is not there) and refuse options a recipe cannot honour
rather than silently ignoring them.
"""

from __future__ import annotations

from pathlib import Path

from plinth.config.load import Resolved, get_value
from plinth.errors import NotSupportedError


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX); others emulate bf16 slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_visible() -> bool:
    """Whether a CUDA device is visible, without importing torch when it is not loaded yet
    (`plinth config validate` stays fast): the NVIDIA driver's /proc entry and
    CUDA_VISIBLE_DEVICES decide."""
    import os
    import sys

    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").is_file()


def environment_warnings(
    resolved: Resolved, cuda_available: bool | None = None, native_bf16: bool | None = None
) -> list[str]:
    """Warnings about running this config here; each says what will happen and the fix."""
    cfg = resolved.config
    hw = cfg.hardware
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    on_cpu = hw.device == "cpu" or (hw.device == "auto" and not cuda_available)
    warnings = []
    if hw.device == "cuda" and not cuda_available:
        warnings.append(
            f"hardware.device=cuda (from {resolved.source('hardware.device')}) but no CUDA device "
            "is visible; the run will stop. Set hardware.device=auto to use the CPU."
        )
    if on_cpu and hw.precision == "bf16":
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        if not native:
            warnings.append(
                "hardware.precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): "
                "autocast will emulate bf16 and run slower than fp32 with less accuracy. Set "
                "hardware.precision=fp32 for this machine."
            )
    if on_cpu and hw.precision == "fp16":
        warnings.append(
            "hardware.precision=fp16 has no fast path on a CPU; plinth will train in fp32 "
            "instead. Set hardware.precision=fp32 (or bf16 on a CPU with native bf16)."
        )
    if on_cpu and hw.compile:
        warnings.append(
            "hardware.compile=true on a CPU: the first steps wait tens of seconds for compilation; "
            "worth it only for runs of many minutes."
        )
    return warnings


def reject_unsupported(resolved: Resolved, unsupported: dict[str, str], recipe: str) -> None:
    """Refuse keys the recipe cannot honour when they are set to a non-default value.

    `unsupported` maps a dotted key to why (e.g. "arrives with the serving issue").
    """
    from plinth.config.schema import Config

    defaults = Config()
    problems = []
    for key, why in unsupported.items():
        value = get_value(resolved.config, key)
        if value != get_value(defaults, key):
            problems.append(f"{key}={value!r} (from {resolved.source(key)}): {why}")
    if problems:
        raise NotSupportedError(
            f"`plinth {recipe}` cannot honour these options yet, and will not ignore them "
            f"silently: {'; '.join(problems)}. Remove them or set them back to their defaults."
        )
