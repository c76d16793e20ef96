"""Weight-only int8: every linear layer's weight (the LM head included) stored as int8 with one
fp scale per output channel; activations stay in floating point.

    python -c "import torch; from plinth.infer.quant import Int8Linear; \
l = torch.nn.Linear(64, 32); q = Int8Linear.from_linear(l); x = torch.randn(2, 64); \
print((q(x) - l(x)).abs().max())"

w ~= scale[n] * q[n, :], scale = max|w[n, :]| / 127 (symmetric, round to nearest): a quarter of
fp32's bytes, and decoding at batch 1 is bound by reading the weights. The product runs through,
in order of preference:
- on AVX2 CPUs, plinth's own kernel (int8_gemv.cpp, compiled once by torch.utils.cpp_extension
  with the `ninja` package's ninja into ~/.cache/plinth/kernels, ~1 min, with a message;
  PLINTH_INT8_KERNEL=0 turns it off): weights widened to
  fp32 in registers, fp32 activations, software prefetch; ~14 GB/s of int8 weights on one core
  of the development machine, where torch's kernel below reaches ~5.5 and an fp32 GEMV ~19 GB/s
  of fp32 weights (4x the bytes);
- `torch.ops.aten._weight_int8pack_mm` (CPU and CUDA kernels that dequantise inside the GEMV):
  on CPU its vectorised path takes bf16 activations (fp32 ones hit a scalar path ~10x slower),
  so activations are rounded to bf16 for it and the result returned in the input's dtype;
- a plain dequantise-then-matmul fallback.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plinth.errors import UsageError

_HAS_PACK_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_KERNEL = None  # the compiled CPU kernel module; False once it is known to be unavailable


KERNEL_NAME = "plinth_int8_gemv"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def pinned_ninja() -> tuple[str, str]:
    """(directory, version) of the ninja that builds plinth's kernels: the `ninja` package's
    (a dependency of plinth), whatever PATH says; the first on PATH only without it. One
    ninja for every build: a different one rejects the other's build log and rebuilds."""
    try:
        import ninja

        return str(Path(ninja.BIN_DIR).resolve()), str(ninja.__version__)
    except (ImportError, AttributeError):
        import shutil
        import subprocess

        exe = shutil.which("ninja")
        if exe is None:
            raise FileNotFoundError("no ninja: pip install ninja") from None
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
        return str(Path(exe).resolve().parent), out.stdout.strip()


def kernel_build_dir() -> tuple[Path, str]:
    """(build directory, ninja directory) of the CPU kernel. The directory is named by a key
    of what the build depends on (source, flags, torch, Python, ninja's version), not by PATH,
    so a build is reused until one of those changes. $PLINTH_KERNEL_DIR overrides the root
    (default ~/.cache/plinth/kernels)."""
    import hashlib
    import platform
    import sys

    ninja_dir, ninja_version = pinned_ninja()
    src = Path(__file__).with_name("int8_gemv.cpp")
    h = hashlib.sha256(src.read_bytes())
    for part in (*_CFLAGS, "|", *_LDFLAGS, torch.__version__, platform.machine(),
                 f"py{sys.version_info[0]}{sys.version_info[1]}", f"ninja-{ninja_version}"):
        h.update(part.encode() + b"\0")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(os.environ.get("PLINTH_KERNEL_DIR") or Path(cache) / "plinth" / "kernels")
    return root / f"int8_gemv-{h.hexdigest()[:16]}", ninja_dir


def _build_kernel():
    """Build (once; later calls load the cached library) and import the kernel module."""
    import fcntl
    import sys
    import time

    from torch.utils.cpp_extension import load

    build_dir, ninja_dir = kernel_build_dir()
    first = not (build_dir / f"{KERNEL_NAME}.so").exists()
    if first:
        print(f"plinth: building the CPU decode kernel (once, about a minute) into {build_dir}",
              file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    t0, path = time.monotonic(), os.environ.get("PATH", "")
    os.environ["PATH"] = ninja_dir + os.pathsep + path  # torch runs `ninja` from PATH
    # torch's build lock is a plain file that a killed build leaves behind, and every later
    # build then waits on it forever. An flock dies with its process: whoever holds it is the
    # only builder, so a torch lock found then is stale and removed.
    guard = open(build_dir / "plinth.flock", "a+")  # noqa: SIM115 (held for the whole build)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        # -fopenmp: at::parallel_for splits rows over torch's threads only when the
        # extension itself is compiled with OpenMP (else it runs on one thread)
        mod = load(KERNEL_NAME, [str(Path(__file__).with_name("int8_gemv.cpp"))],
                   extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                   build_directory=str(build_dir), verbose=False)
    finally:
        os.environ["PATH"] = path
        guard.close()  # releases the flock
    if first:
        print(f"plinth: CPU decode kernel built in {time.monotonic() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return mod


def cpu_kernel():
    """plinth's AVX2 int8 kernel module (built on first use), or None where it cannot be."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = False
        if os.environ.get("PLINTH_INT8_KERNEL", "1") != "0" and \
                torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            try:
                _KERNEL = _build_kernel()
            except Exception as e:  # no compiler, no ninja, ...: torch's kernel instead
                warnings.warn(f"plinth: the int8 CPU kernel could not be built ({type(e).__name__}"
                              f": {str(e)[:200]}); using torch's _weight_int8pack_mm", stacklevel=2)
    return _KERNEL or None


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights (N, K), fp32 scales (N,)) with w ~= scales[:, None] * q."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with int8 per-output-channel weights (see the module docstring)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._use_pack = _HAS_PACK_MM
        self._scale_bf16 = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        q, s = quantize_int8(lin.weight)
        return cls(q, s, lin.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(dtype) * self.scale.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = None
        if x2.device.type == "cpu" and x2.dtype == torch.float32 and cpu_kernel() is not None:
            y = cpu_kernel().int8_mm(x2, self.qweight, self.scale)
        elif self._use_pack:
            try:
                y = self._pack_mm(x2)
            except RuntimeError:  # a device/dtype the kernel does not take: dequantise instead
                self._use_pack = False
        if y is None:
            y = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _pack_mm(self, x2: torch.Tensor) -> torch.Tensor:
        dtype = x2.dtype
        kdtype = torch.bfloat16 if x2.device.type == "cpu" else dtype
        if self._scale_bf16 is None or self._scale_bf16.dtype != kdtype:
            self._scale_bf16 = self.scale.to(kdtype)
        # the kernel reads its operands as dense row-major: strided views (attention output,
        # a fused weight's row slice) must be made contiguous first
        y = torch.ops.aten._weight_int8pack_mm(
            x2.to(kdtype).contiguous(), self.qweight.contiguous(), self._scale_bf16
        )
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def fuse_int8(lins: list[Int8Linear]) -> Int8Linear:
    """One Int8Linear computing several (same input) at once: rows concatenated. Per-channel
    scales make this exact. The originals then hold views into it (no second copy)."""
    q = torch.cat([m.qweight for m in lins])
    s = torch.cat([m.scale for m in lins])
    b = None if lins[0].bias is None else torch.cat([m.bias for m in lins])
    start = 0
    for m in lins:
        n = m.out_features
        m.qweight, m.scale = q[start : start + n], s[start : start + n]
        if b is not None:
            m.bias = b[start : start + n]
        m._scale_bf16 = None
        start += n
    return Int8Linear(q, s, b)


def quantize_model(model: nn.Module, method: str) -> int:
    """Replace every nn.Linear (LM head included; a head tied to the embedding gets its own int8
    copy, the embedding lookup stays in floating point) by an Int8Linear. Returns the count."""
    if method != "int8":
        raise UsageError(f"quantize={method!r}: the only weight-only quantisation is 'int8'")
    from plinth.peft.wrap import WrappedLinear

    if any(isinstance(m, WrappedLinear) for m in model.modules()):
        raise UsageError(
            "quantize='int8' needs plain linear layers: merge the adapter first "
            "(merge_adapter=True) or run the unmerged adapter without quantisation"
        )
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.from_linear(child))
                n += 1
    return n
