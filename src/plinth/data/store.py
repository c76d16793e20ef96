"""The temporary text store of `prepare_dataset`: cleaned documents between the read stage and
the tokenizer and shard stages, on disk so a corpus larger than memory streams through.

Documents are appended as UTF-8, back to back; only their byte spans and source indices are
kept in memory (`Corpus`).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Corpus:
    """The stored documents: document i is bytes starts[i]:ends[i] of `path`, from source
    `source[i]` (an index into data.sources)."""

    path: Path
    starts: np.ndarray  # (N,) int64
    ends: np.ndarray  # (N,) int64
    source: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.ends)

    @cached_property
    def sizes(self) -> np.ndarray:
        """UTF-8 bytes of each document."""
        return self.ends - self.starts

    def texts(self, idx: Iterable[int]) -> Iterator[str]:
        """The documents at `idx` (read front to back is fastest)."""
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                for i in idx:
                    yield m[self.starts[i] : self.ends[i]].decode("utf-8")


class TextStore:
    """Append-only file of UTF-8 documents plus their byte spans (kept in memory)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.ends: list[int] = []
        self.sources: list[int] = []
        self._pos = 0

    def add(self, text: str, source: int) -> int:
        """Append one document of source index `source`; returns its size in bytes."""
        b = text.encode("utf-8")
        self._f.write(b)
        self._pos += len(b)
        self.ends.append(self._pos)
        self.sources.append(source)
        return len(b)

    def finish(self) -> Corpus:
        self._f.close()
        ends = np.asarray(self.ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        return Corpus(self.path, starts, ends, np.asarray(self.sources, dtype=np.int64))
