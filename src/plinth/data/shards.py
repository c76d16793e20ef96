"""Token shards: a small versioned binary format read back with `np.memmap`.

    from plinth.data.shards import Shard
    s = Shard("data/default/train_000000.bin")
    s.doc(0)            # tokens of the first document (a read-only memmap slice)

Layout (little-endian; see docs/data.md):

    offset 0   header, 64 bytes:
               magic     8s   b"PLNTHTOK"
               version   u32  1
               itemsize  u32  2 (uint16 tokens, vocab <= 65536) or 4 (uint32)
               n_tokens  u64  tokens in the shard
               n_docs    u64  documents in the shard
               index_at  u64  byte offset of the document index (8-aligned)
               vocab     u32  vocabulary size the ids come from (< 2**(8*itemsize))
               zero padding to 64 bytes
    offset 64  tokens    n_tokens x itemsize, documents back to back (no separators)
    index_at   offsets   u64 x (n_docs + 1): document i is tokens[offsets[i]:offsets[i+1]]
               sources   u16 x n_docs: index of the source each document came from

Writers stream tokens to `<name>.tmp`, write the index and the final header last, fsync and
rename, so a shard either exists complete or not at all.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from plinth.errors import PlinthError

MAGIC = b"PLNTHTOK"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQQI")  # 48 bytes, zero-padded to HEADER_SIZE


def itemsize_for(vocab_size: int) -> int:
    """2 bytes per token when every id fits in uint16, else 4."""
    return 2 if vocab_size <= 2**16 else 4


def _dtype(itemsize: int) -> np.dtype:
    return np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class ShardWriter:
    """Append documents (token arrays) to one shard; `close()` publishes it atomically."""

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.itemsize = itemsize_for(vocab_size)
        self.dtype = _dtype(self.itemsize)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._f.write(b"\0" * HEADER_SIZE)
        self._offsets = [0]
        self._sources: list[int] = []
        self.n_tokens = 0

    @property
    def n_docs(self) -> int:
        return len(self._sources)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, sources: np.ndarray) -> None:
        """Add documents given as one flat token array plus per-document lengths and sources."""
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise PlinthError(
                f"token id {int(tokens.max())} does not fit the vocab of {self.vocab_size} "
                f"while writing {self.path}; the tokenizer and the recorded vocab disagree"
            )
        self._f.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        ends = self.n_tokens + np.cumsum(lengths, dtype=np.int64)
        self._offsets.extend(ends.tolist())
        self._sources.extend(np.asarray(sources, dtype=np.int64).tolist())
        self.n_tokens = int(ends[-1]) if len(ends) else self.n_tokens

    def close(self) -> dict:
        """Write the index and header, fsync, rename into place; returns the shard's record."""
        f = self._f
        body_end = HEADER_SIZE + self.n_tokens * self.itemsize
        f.write(b"\0" * (_align8(body_end) - body_end))
        index_at = _align8(body_end)
        f.write(np.asarray(self._offsets, dtype="<u8").tobytes())
        f.write(np.asarray(self._sources, dtype="<u2").tobytes())
        f.seek(0)
        f.write(
            _HEADER.pack(
                MAGIC,
                VERSION,
                self.itemsize,
                self.n_tokens,
                self.n_docs,
                index_at,
                self.vocab_size,
            )
        )
        f.flush()
        os.fsync(f.fileno())
        f.close()
        digest = file_sha256(self._tmp)
        os.replace(self._tmp, self.path)
        return {
            "file": self.path.name,
            "tokens": self.n_tokens,
            "docs": self.n_docs,
            "bytes": self.path.stat().st_size,
            "sha256": digest,
        }

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Shard:
    """A shard opened for reading: `tokens`, `offsets` and `sources` are memory maps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(HEADER_SIZE)
        except OSError as e:
            raise PlinthError(f"cannot read shard {self.path}: {e.strerror}") from None
        if len(head) < HEADER_SIZE or head[:8] != MAGIC:
            raise PlinthError(
                f"{self.path} is not a plinth token shard (bad magic); re-run `plinth data "
                "prepare` to rebuild the dataset"
            )
        _magic, version, itemsize, n_tokens, n_docs, index_at, vocab = _HEADER.unpack(
            head[: _HEADER.size]
        )
        if version != VERSION:
            raise PlinthError(
                f"{self.path} has shard format version {version}; this plinth reads version "
                f"{VERSION}. Re-run `plinth data prepare` with this version."
            )
        expected = index_at + 8 * (n_docs + 1) + 2 * n_docs
        if itemsize not in (2, 4) or size != expected:
            raise PlinthError(
                f"{self.path} is truncated or corrupt ({size} bytes on disk, header implies "
                f"{expected}); re-run `plinth data prepare`."
            )
        self.itemsize, self.n_tokens, self.n_docs, self.vocab_size = (
            itemsize,
            n_tokens,
            n_docs,
            vocab,
        )
        self.version = version
        dtype = _dtype(itemsize)
        self.tokens = (
            np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n_tokens,))
            if n_tokens
            else np.zeros(0, dtype=dtype)
        )
        self.offsets = np.memmap(
            self.path, dtype="<u8", mode="r", offset=index_at, shape=(n_docs + 1,)
        )
        self.sources = (
            np.memmap(
                self.path,
                dtype="<u2",
                mode="r",
                offset=index_at + 8 * (n_docs + 1),
                shape=(n_docs,),
            )
            if n_docs
            else np.zeros(0, dtype="<u2")
        )

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets, dtype=np.int64))
