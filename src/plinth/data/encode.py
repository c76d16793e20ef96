"""Stage 4 of `prepare_dataset`: encode the stored documents in order and write the shards.

Documents go to workers in contiguous batches of about 1 MB (each worker loads the tokenizer
from its file once); results come back in order, each document goes to the `train_*.bin` or
`val_*.bin` shards of its split (plinth.data.shards), and a new shard starts every
SHARD_TOKENS tokens. Special-token text inside documents is encoded as plain text, never as
the special token.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from plinth.data.layout import SPLITS, shard_file
from plinth.data.shards import ShardWriter, itemsize_for
from plinth.data.store import Corpus
from plinth.data.workers import WorkerPool

SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB as uint16)
_TOKENIZE_BATCH_BYTES = 1 << 20
_WORKER_TOKENIZERS: dict[str, Any] = {}


def encode_texts(tok, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, lengths) of texts encoded without added special tokens."""
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encs]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _encode_batch(tok_path: str, store_path: str, spans: list[tuple[int, int]], dtype) -> tuple:
    """Worker: encode documents read from the text store; (flat ids, lengths)."""
    tok = _WORKER_TOKENIZERS.get(tok_path)
    if tok is None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tok_path)
        tok.encode_special_tokens = True
        _WORKER_TOKENIZERS.clear()
        _WORKER_TOKENIZERS[tok_path] = tok
    with open(store_path, "rb") as f:
        lo, hi = spans[0][0], spans[-1][1]
        f.seek(lo)
        blob = f.read(hi - lo)
    texts = [blob[a - lo : b - lo].decode("utf-8") for a, b in spans]
    return encode_texts(tok, texts, dtype)


@dataclass(frozen=True)
class ShardResult:
    """Stage 4's output: per split its docs, tokens, bytes, shard records, per-source counts,
    itemsize and bytes per token (the manifest's `splits`)."""

    splits: dict[str, dict]

    @property
    def shard_hashes(self) -> list[str]:
        """sha256 of every shard, sorted."""
        return sorted(s["sha256"] for sp in self.splits.values() for s in sp["shards"])


class _SplitWriter:
    """Open shard writers and running counts of every split."""

    def __init__(self, out: Path, vocab: int, names: list[str]):
        self.out, self.vocab, self.names = out, vocab, names
        self.writers: dict[str, ShardWriter | None] = dict.fromkeys(SPLITS)
        self.info = {
            s: {
                "docs": 0,
                "tokens": 0,
                "bytes": 0,
                "shards": [],
                "sources": {n: {"docs": 0, "tokens": 0, "bytes": 0} for n in names},
            }
            for s in SPLITS
        }

    def add(self, split: str, flat, lengths, src, nbytes) -> None:
        """Append documents (flat ids, their lengths, source indices and text sizes)."""
        d = self.info[split]
        w = self.writers[split]
        if w is None:
            w = self.writers[split] = ShardWriter(
                self.out / shard_file(split, len(d["shards"])), self.vocab
            )
        w.add(flat, lengths, src)
        if w.n_tokens >= SHARD_TOKENS:
            d["shards"].append(w.close())
            self.writers[split] = None
        d["docs"] += len(lengths)
        d["tokens"] += int(lengths.sum())
        d["bytes"] += int(nbytes.sum())
        for s in np.unique(src).tolist():
            m = src == s
            per = d["sources"][self.names[s]]
            per["docs"] += int(m.sum())
            per["tokens"] += int(lengths[m].sum())
            per["bytes"] += int(nbytes[m].sum())

    def close(self, itemsize: int) -> dict:
        for split, w in self.writers.items():
            if w is not None:
                self.info[split]["shards"].append(w.close())
        for d in self.info.values():
            d["itemsize"] = itemsize
            d["bytes_per_token"] = d["bytes"] / d["tokens"] if d["tokens"] else None
        return self.info


def write_shards(
    tok,
    tok_path: Path,
    corpus: Corpus,
    is_val: np.ndarray,
    names: list[str],
    out: Path,
    pool: WorkerPool,
    prog,
) -> ShardResult:
    """Encode every document of `corpus` in order into the shards of its split (`is_val`)."""
    vocab = tok.get_vocab_size()
    dtype = np.dtype("<u2") if itemsize_for(vocab) == 2 else np.dtype("<u4")
    chunks = _chunks(corpus.sizes)
    writer = _SplitWriter(out, vocab, names)
    task = prog.task("tokenize", total=len(corpus))
    if pool.pool is None:
        tok.encode_special_tokens = True
        try:
            results = (encode_texts(tok, list(corpus.texts(range(a, b))), dtype) for a, b in chunks)
            _distribute(results, chunks, corpus, is_val, writer, prog, task)
        finally:
            tok.encode_special_tokens = False
    else:
        starts, ends = corpus.starts, corpus.ends
        results = pool.map(
            _encode_batch,
            (
                (
                    str(tok_path),
                    str(corpus.path),
                    list(zip(starts[a:b].tolist(), ends[a:b].tolist(), strict=True)),
                    dtype,
                )
                for a, b in chunks
            ),
        )
        _distribute(results, chunks, corpus, is_val, writer, prog, task)
    return ShardResult(writer.close(dtype.itemsize))


def _chunks(sizes: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous document ranges of about _TOKENIZE_BATCH_BYTES."""
    chunks = []
    lo, acc = 0, 0
    n = len(sizes)
    for i in range(n):
        acc += int(sizes[i])
        if acc >= _TOKENIZE_BATCH_BYTES or i == n - 1:
            chunks.append((lo, i + 1))
            lo, acc = i + 1, 0
    return chunks


def _distribute(results, chunks, corpus: Corpus, is_val, writer: _SplitWriter, prog, task):
    """Send each encoded batch's documents to their split, in order."""
    for (a, b), (flat, lengths) in zip(chunks, results, strict=False):
        nbytes = corpus.sizes[a:b]
        offs = np.concatenate([[0], np.cumsum(lengths)])
        val = is_val[a:b]
        for split, mask in (("train", ~val), ("val", val)):
            if not mask.any():
                continue
            if mask.all():
                sel_flat = flat
            else:
                sel_flat = np.concatenate(
                    [flat[offs[i] : offs[i + 1]] for i in np.flatnonzero(mask)]
                )
            writer.add(split, sel_flat, lengths[mask], corpus.source[a:b][mask], nbytes[mask])
        prog.update(task, completed=b)
