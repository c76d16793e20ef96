"""One spelling of floating-point dtypes everywhere: fp32, bf16, fp16 (the config's), with
torch's names (float32, bfloat16, float16, and half / float) accepted as input.

    python -c "from plinth.config.dtypes import canonical_dtype; print(canonical_dtype('bfloat16'))"
"""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16")
ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
           "half": "fp16"}


def canonical_dtype(name):
    """`name` in plinth's spelling (fp32, bf16, fp16) when it is one of the accepted spellings
    (case and a "torch." prefix ignored); anything else unchanged, for the caller to refuse."""
    if not isinstance(name, str):
        return name
    key = name.strip().lower().removeprefix("torch.")
    return key if key in DTYPES else ALIASES.get(key, name)


def dtype_choices() -> str:
    """The accepted spellings, for messages: "fp32, bf16 or fp16 (or float32, ...)"."""
    return "fp32, bf16 or fp16 (float32, bfloat16, float16 also accepted)"
