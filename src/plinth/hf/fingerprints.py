"""The one fingerprint of a model's weights: recorded in an imported directory's import.json and
in every saved adapter (`plinth_base_fingerprint`), so an adapter refuses a base it was not
trained on.

    python -c "import torch; from plinth.hf.fingerprints import fingerprint; \
print(fingerprint({'w': torch.ones(3, 4)}))"

Defined over the base weights under plinth's parameter names (tied tensors once, adapters left
out), so it does not depend on the file, the process or the device that holds them: an adapter
trained on `plinth import`'s output records exactly the `fingerprint` in its import.json. Values
are rounded to bf16 first, so fp32 and bf16 copies of one model agree.

It is a SHA-256 over each tensor's name and shape and an evenly spaced sample of its values
(at least SAMPLE values, and at least one from every row: every token embedding and every
output feature), which keeps it cheap (~30 ms for a 135M-parameter model on CPU, against ~0.5 s
for hashing every byte) while any training of the same architecture, which moves nearly all
weights, changes it. It identifies a base model; it is not a tamper check of every byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

SCHEME = "sampled-sha256"  # the prefix of every fingerprint; another scheme gets another name
SAMPLE = 4096  # values per tensor at least (all of a smaller tensor)


@torch.no_grad()
def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """`SCHEME:<hex>` for weights under their names (see the module doc). Pass plinth names, one
    entry per tensor (`dict(model.named_parameters())` lists a tied tensor once), before
    quantisation or merging changes them."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{tuple(t.shape)}\n".encode())
        h.update(_sample(t).tobytes())
    return f"{SCHEME}:{h.hexdigest()}"


def _sample(t: torch.Tensor) -> np.ndarray:
    """The sampled values as bf16 bit patterns (integers as int64). In numpy: hundreds of tiny
    torch ops would each pay for waking its thread pool, seconds on a busy machine."""
    flat = t.reshape(-1)
    n = flat.numel()
    rows = t.shape[0] if t.dim() > 1 else 1
    k = min(n, max(SAMPLE, rows + 1))  # steps of at most one row: every row is sampled
    idx = np.arange(k, dtype=np.int64) * (n - 1) // max(k - 1, 1)  # exact integers
    if flat.device.type != "cpu":
        flat, idx = flat[torch.from_numpy(idx).to(flat.device)].cpu(), slice(None)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy()[idx]
    if not flat.is_floating_point():
        return flat.numpy()[idx].astype(np.int64)
    values = flat.numpy()[idx].astype(np.float32)  # fp16 exactly, fp64 rounded to nearest
    u = values.view(np.uint32)
    bits = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)  # torch's bf16 rounding
    bits[np.isnan(values)] = 0x7FC0
    return bits.view(np.int16)


def is_current(value: object) -> bool:
    """Whether a recorded fingerprint was made by this scheme (older plinth versions used
    others, which cannot be compared)."""
    return isinstance(value, str) and value.startswith(SCHEME + ":")
