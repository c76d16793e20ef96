"""Files plinth writes for people: created with the mode a new file normally gets (0666 less
the umask, typically 0644), including the ones safetensors writes (which creates them 0600).

    python -c "from plinth.track.files import default_mode; print(oct(default_mode()))"
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def default_mode() -> int:
    """0666 less the process umask: what open() gives a new file."""
    with _LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def normal_mode(path: str | Path) -> None:
    """Give a file plinth created the normal mode for a new file (see the module docstring)."""
    os.chmod(path, default_mode())


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, with the file's mode the normal one, not 0600."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    normal_mode(path)
