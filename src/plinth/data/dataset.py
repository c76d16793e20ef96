"""A prepared dataset on disk: manifest, tokenizer and memory-mapped shards.

from plinth.data import open_dataset
ds = open_dataset("data/default")
ds.num_tokens("train"), ds.bytes_per_token("val"), ds.eos_id
ds.decode(ds.doc_tokens("train", 0)[:50])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from plinth.data.layout import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, TOKENIZER
from plinth.data.shards import Shard, file_sha256
from plinth.errors import PlinthError, UsageError


@dataclass(frozen=True)
class DocTable:
    """Where each document of a split lives: shard index, start within it, length, source."""

    shard: np.ndarray  # (N,) int32
    start: np.ndarray  # (N,) int64 token offset inside its shard
    length: np.ndarray  # (N,) int64 tokens
    source: np.ndarray  # (N,) int64 index into the manifest's sources

    def __len__(self) -> int:
        return len(self.length)


class Dataset:
    """Read access to a directory written by `prepare_dataset`."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise UsageError(
                f"no prepared dataset at {self.path} (missing {MANIFEST}); run `plinth data "
                "prepare CONFIG` first (data.dir says where it writes)."
            )
        try:
            self.manifest: dict = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError as e:
            raise PlinthError(
                f"{mpath} is not valid JSON ({e}); re-run `plinth data prepare`"
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise PlinthError(f"{mpath} is not a plinth dataset manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise PlinthError(
                f"{self.path} was prepared with dataset format version "
                f"{self.manifest.get('format_version')}, this plinth reads {FORMAT_VERSION}; "
                "re-run `plinth data prepare`."
            )
        for split in SPLITS:
            for rec in self.manifest["splits"][split]["shards"]:
                p = self.path / rec["file"]
                if not p.is_file() or p.stat().st_size != rec["bytes"]:
                    raise PlinthError(
                        f"shard {p} is missing or has the wrong size (manifest says "
                        f"{rec['bytes']} bytes); the dataset is incomplete. Re-run `plinth data "
                        "prepare`."
                    )
                if verify and file_sha256(p) != rec["sha256"]:
                    raise PlinthError(f"shard {p} does not match its sha256 in the manifest")
        roles = self.manifest["tokenizer"]["roles"]
        self.eos_id: int = roles["eos_id"]
        self.pad_id: int = roles["pad_id"]
        self.mask_id: int | None = roles["mask_id"]
        self.bos_id: int = roles["bos_id"]
        self.sentinel_ids: list[int] = list(roles["sentinel_ids"])
        self._shards: dict[str, list[Shard]] = {}
        self._tables: dict[str, DocTable] = {}

    def __repr__(self) -> str:
        return (
            f"Dataset({str(self.path)!r}, train={self.num_tokens('train'):,} tokens, "
            f"val={self.num_tokens('val'):,} tokens, vocab={self.vocab_size})"
        )

    # ---- identity and tokenizer ------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / TOKENIZER))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def source_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["sources"]]

    @property
    def source_weights(self) -> list[float]:
        return [float(s["weight"]) for s in self.manifest["sources"]]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # ---- splits --------------------------------------------------------------------------

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise UsageError(f"unknown split {split!r}; this dataset has {list(SPLITS)}")
        return self.manifest["splits"][split]

    def num_tokens(self, split: str) -> int:
        """Document tokens in a split (separators added by packing are not counted)."""
        return int(self._split(split)["tokens"])

    def num_docs(self, split: str) -> int:
        return int(self._split(split)["docs"])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token: bits/byte = loss_nats / ln(2) / bytes_per_token.
        NaN for an empty split."""
        v = self._split(split)["bytes_per_token"]
        return float(v) if v is not None else math.nan

    def shards(self, split: str) -> list[Shard]:
        if split not in self._shards:
            self._shards[split] = [
                Shard(self.path / rec["file"]) for rec in self._split(split)["shards"]
            ]
        return self._shards[split]

    def doc_table(self, split: str) -> DocTable:
        """All documents of a split, in shard order (the order they were prepared in)."""
        if split not in self._tables:
            shard, start, length, source = [], [], [], []
            for k, s in enumerate(self.shards(split)):
                offs = np.asarray(s.offsets, dtype=np.int64)
                shard.append(np.full(s.n_docs, k, dtype=np.int32))
                start.append(offs[:-1])
                length.append(np.diff(offs))
                source.append(np.asarray(s.sources, dtype=np.int64))

            def cat(xs, dt):
                return np.concatenate(xs) if xs else np.zeros(0, dtype=dt)

            self._tables[split] = DocTable(
                cat(shard, np.int32),
                cat(start, np.int64),
                cat(length, np.int64),
                cat(source, np.int64),
            )
        return self._tables[split]

    def doc_tokens(self, split: str, i: int) -> np.ndarray:
        t = self.doc_table(split)
        s = self.shards(split)[int(t.shard[i])]
        a = int(t.start[i])
        return s.tokens[a : a + int(t.length[i])]


def open_dataset(path: str | Path, verify: bool = False) -> Dataset:
    """Open a prepared dataset directory (`verify=True` also checks every shard's sha256)."""
    return Dataset(path, verify=verify)
