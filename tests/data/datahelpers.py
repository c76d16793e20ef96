"""Helpers for the data-pipeline tests: tiny synthetic corpora and fast configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from plinth.config.schema import Config

_TEXT = (
    "the model reads text and learns which token comes next so that it can write new text data "
    "pipeline shards tokens documents train validation loader batch packing seed epoch python "
    "code function class module value return list dict string number error file path river "
    "mountain forest ocean city market garden window music letter paper story friend quickly "
    "slowly carefully happily bright dark warm cold green blue small large ancient"
)
WORDS = _TEXT.split(" ")


def sentence(rng: random.Random) -> str:
    n = rng.randint(5, 14)
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def document(rng: random.Random, min_lines: int = 2, max_lines: int = 30) -> str:
    return "\n".join(sentence(rng) for _ in range(rng.randint(min_lines, max_lines))) + "\n"


def write_text_corpus(root: Path, n: int, seed: int = 0, prefix: str = "doc") -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        t = document(rng)
        (root / f"{prefix}{i:04d}.txt").write_text(t, encoding="utf-8")
        texts.append(t)
    return texts


def write_jsonl(path: Path, n: int, seed: int = 1, field: str = "text") -> list[str]:
    rng = random.Random(seed)
    texts = [document(rng) for _ in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return texts


def make_config(out: Path, sources: list[dict], seed: int = 7, vocab: int = 512, **data) -> Config:
    """A small, fast config: byte-level BPE with a tiny vocab, few filters thresholds touched."""
    d = {"dir": str(out), "sources": sources, "val_fraction": 0.1}
    for key, value in data.items():
        section, _, field = key.partition("__")
        if field:
            d.setdefault(section, {})[field] = value
        else:
            d[key] = value
    return Config.model_validate({"seed": seed, "model": {"vocab_size": vocab}, "data": d})


SRC = Path(__file__).resolve().parents[2] / "src"


def run_plinth(*args, timeout: float = 120, prefix: tuple = (), cwd=None):
    """`python -m plinth ARGS` as a real process (this checkout's src first on the path);
    a hang fails the test through subprocess.TimeoutExpired instead of stalling the suite."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200"}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "plinth", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
    )


def write_config(path: Path, out: Path, sources: list[dict], vocab: int = 512, **data) -> Path:
    """A YAML config file (JSON is YAML) for the `plinth data ...` commands."""
    d = {"dir": str(out), "sources": sources, "val_fraction": 0.1, "workers": 1, **data}
    path.write_text(json.dumps({"seed": 7, "model": {"vocab_size": vocab}, "data": d}))
    return path


def without_dac_override() -> tuple:
    """A command prefix under which root meets permission checks (root ignores chmod), or
    () when not root; None when that cannot be arranged here."""
    import os
    import shutil

    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return ("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--")
