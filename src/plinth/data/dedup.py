"""Exact and near-duplicate detection: normalised-text hashes, MinHash signatures and LSH.

    from plinth.data.dedup import NearDedup, minhash_signatures
    sigs = minhash_signatures(texts, num_perm=128, shingle=5)
    dd = NearDedup(threshold=0.8, num_perm=128)
    kept = [dd.add(sig) is None for sig in sigs]     # first of each cluster is kept

Shingles are word n-grams of the lower-cased text. Words are hashed by `rensa` (Rust), n-grams
combined with a vectorised polynomial hash in numpy, and rensa's MinHash turns each document's
shingle hashes into `num_perm` 32-bit minima. The LSH index is banded (bands x rows chosen to
minimise false positives + false negatives at the threshold, like datasketch); every band hit
is verified by comparing signatures, so a collision never merges two distinct documents.
Clustering is greedy in corpus order: a document joins the first earlier representative it
matches, otherwise it becomes a representative itself. Memory: num_perm*4 bytes per kept doc.
`CorpusDedup` runs both in the order `plinth data prepare` uses: exact first, then near.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain

import numpy as np

MINHASH_SEED = 1  # fixed: duplicates are a property of the corpus, not of the run's seed
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) for n-gram hashing


def exact_key(text: str) -> bytes:
    """Hash of the text with case and whitespace runs normalised: catches re-formatted copies."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes of each text as one flat uint64 array plus row offsets (len+1).

    A text with fewer than n words contributes a single shingle made of all its words."""
    import rensa

    words = [t.lower().split() for t in texts]
    lens = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    total = int(lens.sum())
    flat = np.fromiter(
        chain.from_iterable(rensa.RMinHash.hash_token_sets(words)), dtype=np.uint64, count=total
    )
    starts = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point
        if total >= n:
            h = flat[: total - n + 1].copy()
            for k in range(1, n):
                h = h * _MIX + flat[k : total - n + 1 + k]
        else:
            h = np.zeros(0, dtype=np.uint64)
        # window p is valid when it ends inside its document: p + n <= end of that document
        n_windows = np.maximum(lens - n + 1, 0)
        pieces, out_lens = [], np.empty(len(words), dtype=np.int64)
        for i, (s, nw, ln) in enumerate(zip(starts[:-1], n_windows, lens, strict=False)):
            if nw > 0:
                pieces.append(h[s : s + nw])
                out_lens[i] = nw
            else:  # short (or empty) document: one shingle of whatever words it has
                acc = np.uint64(len(texts[i]) + 1)
                for v in flat[s : s + ln]:
                    acc = acc * _MIX + v
                pieces.append(np.array([acc], dtype=np.uint64))
                out_lens[i] = 1
    offsets = np.zeros(len(words) + 1, dtype=np.uint64)
    np.cumsum(out_lens, out=offsets[1:])
    flat_out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint64)
    return flat_out, offsets


def minhash_signatures(texts: list[str], num_perm: int = 128, shingle: int = 5) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures of the texts' word-shingle sets."""
    import rensa

    if not texts:
        return np.zeros((0, num_perm), dtype=np.uint32)
    flat, offsets = shingle_hashes(texts, shingle)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        flat, offsets, num_perm, MINHASH_SEED
    )
    return np.asarray(matrix.to_rows(), dtype=np.uint32)


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising the equally weighted false-positive and false-negative
    areas of the LSH S-curve at `threshold` (the choice datasketch's MinHashLSH makes)."""
    s_lo = np.linspace(0.0, threshold, 200)
    s_hi = np.linspace(threshold, 1.0, 200)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
            fn = np.trapezoid((1 - s_hi**r) ** b, s_hi)
            err = 0.5 * fp + 0.5 * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class NearDedup:
    """Greedy MinHash-LSH clustering in insertion order; one representative per cluster."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128):
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(0x15A)
        self._mult = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) * 2 + 1
        self._tables: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self.cluster_sizes: list[int] = []  # per representative, itself included
        self.candidates_checked = 0

    @property
    def num_representatives(self) -> int:
        return len(self.cluster_sizes)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(n, bands) uint64 bucket keys: each band's rows hashed to one integer."""
        used = sigs[:, : self.bands * self.rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            return (used.reshape(len(sigs), self.bands, self.rows) * self._mult).sum(axis=2)

    def add_many(self, sigs: np.ndarray) -> list[int | None]:
        """Add documents in order; for each, the cluster id it duplicates, or None if new."""
        keys = self.band_keys(sigs)
        return [self.add_with_keys(sig, row) for sig, row in zip(sigs, keys, strict=False)]

    def add(self, sig: np.ndarray) -> int | None:
        return self.add_many(sig[None, :])[0]

    def add_with_keys(self, sig: np.ndarray, keys) -> int | None:
        """Add one document whose band keys (a row of `band_keys`) are already computed."""
        keys = keys.tolist() if isinstance(keys, np.ndarray) else keys
        seen: set[int] = set()
        for table, key in zip(self._tables, keys, strict=False):
            for rep in table.get(key, ()):
                if rep in seen:
                    continue
                seen.add(rep)
                self.candidates_checked += 1
                if np.count_nonzero(self._sigs[rep] == sig) >= self.threshold * self.num_perm:
                    self.cluster_sizes[rep] += 1
                    return rep
        rep = len(self.cluster_sizes)
        if rep == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[rep] = sig
        self.cluster_sizes.append(1)
        for table, key in zip(self._tables, keys, strict=False):
            bucket = table.get(key)
            if bucket is None:
                table[key] = [rep]
            else:
                bucket.append(rep)
        return None

    def stats(self) -> dict:
        sizes = np.asarray(self.cluster_sizes, dtype=np.int64)
        dup = sizes[sizes > 1]
        return {
            "bands": self.bands,
            "rows_per_band": self.rows,
            "clusters_with_duplicates": len(dup),
            "largest_cluster": int(dup.max()) if len(dup) else 1,
            "candidates_checked": self.candidates_checked,
        }


@dataclass(frozen=True)
class DedupResult:
    """What deduplication of a corpus found (the manifest's `dedup` counts)."""

    exact_clusters: int  # documents of which at least one exact copy was dropped
    near: dict = field(default_factory=dict)  # NearDedup.stats() when near dedup ran


class CorpusDedup:
    """Exact, then near deduplication of documents seen one at a time in corpus order; the
    first document of every cluster is kept.

        dedup = CorpusDedup(exact=True, near=True, threshold=0.8, num_perm=128)
        bands = dedup.band_keys(sigs)                      # once per batch of signatures
        verdict = dedup.check(exact_key(text), sigs[i], bands[i])   # None | "exact" | "near"
    """

    def __init__(self, exact: bool, near: bool, threshold: float, num_perm: int):
        self.exact = exact
        self.near = NearDedup(threshold, num_perm) if near else None
        self._first: dict[bytes, int] = {}  # exact key -> cluster id
        self._copies: Counter = Counter()  # cluster id -> dropped copies

    def band_keys(self, sigs: np.ndarray | None) -> np.ndarray | None:
        """LSH band keys of a batch of signatures (None without near dedup or signatures)."""
        return self.near.band_keys(sigs) if self.near is not None and len(sigs) else None

    def check(self, key: bytes | None, sig: np.ndarray | None, band_keys) -> str | None:
        """Record one document; "exact" or "near" when it duplicates an earlier one, else None.
        `key` is its exact_key (None without exact dedup), `sig`/`band_keys` its MinHash
        signature and band keys (None without near dedup)."""
        if self.exact:
            if key in self._first:
                self._copies[self._first[key]] += 1
                return "exact"
            self._first[key] = len(self._first)
        if self.near is not None and self.near.add_with_keys(sig, band_keys) is not None:
            return "near"
        return None

    def result(self) -> DedupResult:
        return DedupResult(len(self._copies), self.near.stats() if self.near is not None else {})
