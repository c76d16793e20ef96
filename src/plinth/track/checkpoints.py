"""How checkpoint directories are named inside a run: the one place that writes and reads
`checkpoints/step_XXXXXXX/` names (training saves them, reports list them).

A checkpoint is written as `step_XXXXXXX.tmp/` and renamed into place, so a name with the
`.tmp` suffix is a crash's leftover, never a checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

PREFIX = "step_"
TMP_SUFFIX = ".tmp"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def step_dir(checkpoints: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives (zero-padded, so names sort by step)."""
    return checkpoints / f"{PREFIX}{step:07d}"


def tmp_dir(final: Path) -> Path:
    """The name a checkpoint is written under before it is renamed to `final`."""
    return final.with_name(final.name + TMP_SUFFIX)


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory name; None for anything else (.tmp leftovers too)."""
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (.tmp leftovers of a crash are ignored)."""
    if not checkpoints.is_dir():
        return []
    found = [
        p for p in checkpoints.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None
    ]
    return sorted(found, key=lambda p: (checkpoint_step(p.name), p.name))
