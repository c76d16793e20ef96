"""Packed, deterministic, resumable batches of token rows from a prepared dataset.

    from plinth.data import open_dataset, PackedLoader
    ds = open_dataset("data/default")
    loader = PackedLoader(ds, "train", seq_len=256, batch_size=8, seed=1337)
    batch = next(iter(loader))          # LongTensor (8, 257): inputs batch[:, :-1], targets [:, 1:]
    sd = loader.state_dict()            # a few ints; load_state_dict(sd) continues exactly here

Packing (per source, per epoch):
- `concat`: documents in a seeded order, each followed by EOS, cut into rows of seq_len + 1
  tokens; rows may start mid-document. Nothing is padded; the last partial row is dropped.
- `bos_aligned`: every row starts with BOS at a document start. Each document becomes
  BOS + tokens + EOS; documents longer than a row are cut into row-sized pieces, each starting
  with BOS. Pieces are best-fit packed (largest piece that fits the space left, from a window
  of 1000); when none fits, the shortest is cropped to fill the row exactly (the cropped tail
  is not used this epoch). No padding.

Order: with `shuffle`, documents are permuted and rows are permuted again per epoch, both from
generators seeded by (seed, source, epoch). The `short_first` curriculum (from the dataset's
config for the train split, unless given) orders the first epoch's documents by length and
keeps its rows in order. `loop=False` is one pass with the sources interleaved evenly.

Mixtures: each global row is drawn from a source with probability proportional to its weight
(seeded, in blocks of 4096 rows), so the mix is exact in expectation and resumable. A source
that runs out starts its next epoch; the others are unaffected.

Ranks: global batch k is rows [k*B*W, (k+1)*B*W) of the global stream; rank r takes the r-th
slice of B rows. Ranks never share a row, and the state (global row + per-source positions) is
the same on every rank, so a job can resume with a different batch size or world size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from plinth.errors import PlinthError, UsageError

_MIX_BLOCK = 4096
_BESTFIT_WINDOW = 1000
STATE_VERSION = 1


@dataclass
class _Layout:
    """The rows of one epoch of one source."""

    n_rows: int
    perm: np.ndarray | None  # row order (None = natural)
    # concat: docs in order and the stream offset where each starts (doc + EOS)
    order: np.ndarray | None = None
    cum: np.ndarray | None = None
    # bos_aligned: CSR of segments per row; a segment is BOS + doc'[a : a + n] (doc' = doc+EOS)
    row_ptr: np.ndarray | None = None
    seg_doc: np.ndarray | None = None
    seg_a: np.ndarray | None = None
    seg_n: np.ndarray | None = None


class PackedLoader:
    """Iterate (batch_size, seq_len + 1) LongTensors of packed token rows. See module doc."""

    def __init__(
        self,
        ds,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        packing: str = "concat",
        shuffle: bool = True,
        loop: bool = True,
        weights: list[float] | dict[str, float] | None = None,
        curriculum: str | None = None,
    ):
        if packing not in ("concat", "bos_aligned"):
            raise UsageError(f"packing={packing!r}: use concat or bos_aligned (data.packing)")
        if seq_len < 1 or batch_size < 1:
            raise UsageError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        self.ds, self.split = ds, split
        self.seq_len, self.row_len = seq_len, seq_len + 1
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.packing, self.shuffle, self.loop = packing, shuffle, loop
        # the dataset's curriculum orders training only; evaluation sees the plain order
        default = ds.manifest["config"].get("curriculum", "none") if split == "train" else "none"
        self.curriculum = curriculum or default
        if self.curriculum not in ("none", "short_first"):
            raise UsageError(f"curriculum={self.curriculum!r}: use none or short_first")
        self.table = ds.doc_table(split)
        if len(self.table) == 0:
            raise PlinthError(
                f"the {split!r} split of {ds.path} has no documents"
                + (" (data.val_fraction is 0 or the corpus is tiny)" if split == "val" else "")
                + "; prepare more data or use another split."
            )
        self._shards = ds.shards(split)
        self._eos, self._bos = ds.eos_id, ds.bos_id

        names = ds.source_names
        w = self._resolve_weights(weights, names)
        docs_of = [np.flatnonzero(self.table.source == s) for s in range(len(names))]
        self.sources = [s for s in range(len(names)) if len(docs_of[s]) and w[s] > 0]
        if not self.sources:
            raise UsageError(f"no source of split {split!r} has a positive weight: {w}")
        self._docs = [docs_of[s] for s in self.sources]
        p = np.asarray([w[s] for s in self.sources], dtype=np.float64)
        self.probs = p / p.sum()
        self._layouts: dict[tuple[int, int], _Layout] = {}
        for a, s in enumerate(self.sources):
            if self._layout(a, 0).n_rows == 0:
                raise PlinthError(
                    f"source {names[s]!r} in split {split!r} has "
                    f"{self.table.length[self._docs[a]].sum()} tokens, not enough for one row "
                    f"of seq_len + 1 = {self.row_len}; lower seq_len or add data."
                )
        self._rows_epoch0 = sum(self._layout(a, 0).n_rows for a in range(len(self.sources)))
        self._global = 0
        self._pos = [[0, 0] for _ in self.sources]  # per source: [epoch, row within epoch]
        self._resumed = False
        self._mix_cache: tuple[int, np.ndarray] | None = None
        self._pass_order: tuple[np.ndarray, np.ndarray] | None = None
        self.batch_sources = np.zeros(0, dtype=np.int64)  # source index of each row last yielded

    # ---- configuration helpers ---------------------------------------------------------

    def _resolve_weights(self, weights, names: list[str]) -> list[float]:
        if weights is None:
            return list(self.ds.source_weights)
        if isinstance(weights, dict):
            unknown = set(weights) - set(names)
            if unknown:
                raise UsageError(f"weights name unknown sources {sorted(unknown)}; have {names}")
            return [float(weights.get(n, 0.0)) for n in names]
        if len(weights) != len(names):
            raise UsageError(f"weights has {len(weights)} entries for {len(names)} sources {names}")
        if any(x < 0 for x in weights):
            raise UsageError(f"weights must be >= 0, got {list(weights)}")
        return [float(x) for x in weights]

    @property
    def epoch(self) -> float:
        """Passes over the split so far, measured in rows (global, all ranks together)."""
        total = self._pass_rows() if not self.loop else self._rows_epoch0
        return self._global / total

    def __len__(self) -> int:
        """Batches per rank in one pass (loop=False) or one epoch's worth (loop=True)."""
        rows = (self._pass_rows() if not self.loop else self._rows_epoch0) // self.world_size
        return -(-rows // self.batch_size) if not self.loop else rows // self.batch_size

    # ---- layouts -------------------------------------------------------------------------

    def _rng(self, tag: int, a: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, tag, self.sources[a], epoch])

    def _layout(self, a: int, epoch: int) -> _Layout:
        key = (a, epoch)
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) > 4 * len(self.sources):  # keep a few recent epochs
                for k in sorted(self._layouts, key=lambda k: k[1])[: len(self.sources)]:
                    del self._layouts[k]
            lay = self._layouts[key] = self._make_layout(a, epoch)
        return lay

    def _make_layout(self, a: int, epoch: int) -> _Layout:
        docs = self._docs[a]
        lengths = self.table.length[docs]
        curriculum = self.curriculum == "short_first" and epoch == 0
        if self.shuffle or curriculum:
            perm = self._rng(0xD0C, a, epoch).permutation(len(docs))
        else:
            perm = np.arange(len(docs))
        if curriculum:  # by length; the seeded permutation breaks ties
            perm = perm[np.argsort(lengths[perm], kind="stable")]
        order = docs[perm]
        shuffle_rows = self.shuffle and not curriculum
        if self.packing == "concat":
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.table.length[order] + 1, out=cum[1:])
            n_rows = int(cum[-1] // self.row_len)
            rperm = self._rng(0x507, a, epoch).permutation(n_rows) if shuffle_rows else None
            return _Layout(n_rows, rperm, order=order, cum=cum)
        row_ptr, seg_doc, seg_a, seg_n = self._best_fit(order)
        n_rows = len(row_ptr) - 1
        rperm = self._rng(0x507, a, epoch).permutation(n_rows) if shuffle_rows else None
        return _Layout(n_rows, rperm, row_ptr=row_ptr, seg_doc=seg_doc, seg_a=seg_a, seg_n=seg_n)

    def _best_fit(self, order: np.ndarray):
        """BOS-aligned best-fit packing of the documents in `order` into rows."""
        R, C = self.row_len, self.row_len - 1  # a segment is BOS + up to C tokens of doc+EOS
        lengths = self.table.length[order] + 1  # + EOS

        def segments():
            for d, n in zip(order.tolist(), lengths.tolist(), strict=False):
                for a in range(0, n, C):
                    yield d, a, min(C, n - a)

        feed = segments()
        keys: list[tuple[int, int]] = []  # sorted (segment length incl. BOS, arrival number)
        segs: dict[int, tuple[int, int, int]] = {}
        arrival = 0

        def refill() -> None:
            nonlocal arrival
            while len(keys) < _BESTFIT_WINDOW:
                seg = next(feed, None)
                if seg is None:
                    return
                segs[arrival] = seg
                bisect.insort(keys, (seg[2] + 1, arrival))
                arrival += 1

        row_ptr, seg_doc, seg_a, seg_n = [0], [], [], []
        refill()
        while keys:
            remaining, row = R, []
            while remaining > 0 and keys:
                j = bisect.bisect_right(keys, (remaining, float("inf"))) - 1
                if j >= 0:
                    length, k = keys.pop(j)
                    d, a, n = segs.pop(k)
                    remaining -= length
                else:  # nothing fits: crop the shortest piece to fill the row exactly
                    _, k = keys.pop(0)
                    d, a, n = segs.pop(k)
                    n, remaining = remaining - 1, 0
                row.append((d, a, n))
                refill()
            if remaining > 0:  # ran out of documents: the last partial row is not used
                break
            for d, a, n in row:
                seg_doc.append(d)
                seg_a.append(a)
                seg_n.append(n)
            row_ptr.append(len(seg_doc))

        def as64(x):
            return np.asarray(x, dtype=np.int64)

        return as64(row_ptr), as64(seg_doc), as64(seg_a), as64(seg_n)

    # ---- rows ------------------------------------------------------------------------------

    def _doc(self, d: int) -> np.ndarray:
        t = self.table
        s = self._shards[int(t.shard[d])]
        a = int(t.start[d])
        return s.tokens[a : a + int(t.length[d])]

    def _row(self, a: int, epoch: int, r: int, out: np.ndarray) -> None:
        lay = self._layout(a, epoch)
        r = int(lay.perm[r]) if lay.perm is not None else r
        R = self.row_len
        if self.packing == "concat":
            pos = r * R
            i = int(np.searchsorted(lay.cum, pos, side="right")) - 1
            filled = 0
            while filled < R:
                d = int(lay.order[i])
                length = int(lay.cum[i + 1] - lay.cum[i]) - 1
                off = pos - int(lay.cum[i])
                if off < length:
                    take = min(length - off, R - filled)
                    out[filled : filled + take] = self._doc(d)[off : off + take]
                    filled += take
                    pos += take
                else:
                    out[filled] = self._eos
                    filled += 1
                    pos += 1
                    i += 1
            return
        filled = 0
        for k in range(int(lay.row_ptr[r]), int(lay.row_ptr[r + 1])):
            d, start, n = int(lay.seg_doc[k]), int(lay.seg_a[k]), int(lay.seg_n[k])
            out[filled] = self._bos
            filled += 1
            doc = self._doc(d)
            body = min(n, len(doc) - start)  # the doc's own tokens in this piece
            if body > 0:
                out[filled : filled + body] = doc[start : start + body]
                filled += body
            if n > body:  # the piece reaches the document's end: EOS
                out[filled] = self._eos
                filled += 1
        assert filled == R, (filled, R)

    # ---- global stream ---------------------------------------------------------------------

    def _choice(self, g: int) -> int:
        if len(self.sources) == 1:
            return 0
        block = g // _MIX_BLOCK
        if self._mix_cache is None or self._mix_cache[0] != block:
            rng = np.random.default_rng([self.seed, 0x313, block])
            self._mix_cache = (block, rng.choice(len(self.sources), _MIX_BLOCK, p=self.probs))
        return int(self._mix_cache[1][g % _MIX_BLOCK])

    def _pass_rows(self) -> int:
        """loop=False: rows in the pass, trimmed so every rank gets the same number."""
        return self._rows_epoch0 // self.world_size * self.world_size

    def _pass_row(self, g: int) -> tuple[int, int]:
        """loop=False: (source, row) of global row g. Sources are interleaved evenly by their
        size, so any prefix of the pass (e.g. the first eval_batches) covers every source."""
        if self._pass_order is None:
            sizes = [self._layout(a, 0).n_rows for a in range(len(self.sources))]
            src = np.concatenate([np.full(n, a, dtype=np.int64) for a, n in enumerate(sizes)])
            row = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
            key = (row + 0.5) / np.asarray(sizes, dtype=np.float64)[src]
            order = np.argsort(key, kind="stable")
            self._pass_order = (src[order], row[order])
        return int(self._pass_order[0][g]), int(self._pass_order[1][g])

    def __iter__(self):
        import torch

        B, W = self.batch_size, self.world_size
        if not self.loop and not self._resumed:
            self._global = 0  # every pass starts at the beginning unless resuming mid-pass
        self._resumed = False
        while True:
            g0 = self._global
            if self.loop:
                n_global = B * W
                per_rank = B
            else:
                left = self._pass_rows() - g0
                if left <= 0:
                    return
                n_global = min(B * W, left)
                per_rank = n_global // W
            mine = range(g0 + self.rank * per_rank, g0 + (self.rank + 1) * per_rank)
            out = np.empty((per_rank, self.row_len), dtype=np.int64)
            srcs = np.empty(per_rank, dtype=np.int64)
            for g in range(g0, g0 + n_global):
                if self.loop:
                    a = self._choice(g)
                    epoch, r = self._pos[a]
                    if g in mine:
                        self._row(a, epoch, r, out[g - mine.start])
                        srcs[g - mine.start] = self.sources[a]
                    r += 1
                    if r >= self._layout(a, epoch).n_rows:
                        epoch, r = epoch + 1, 0
                    self._pos[a] = [epoch, r]
                elif g in mine:
                    a, r = self._pass_row(g)
                    self._row(a, 0, r, out[g - mine.start])
                    srcs[g - mine.start] = self.sources[a]
            self._global = g0 + n_global
            self.batch_sources = srcs
            yield torch.from_numpy(out)

    # ---- state -------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "packing": self.packing,
            "shuffle": self.shuffle,
            "loop": self.loop,
            "curriculum": self.curriculum,
            "fingerprint": self.ds.fingerprint,
            "sources": [int(s) for s in self.sources],
            "probs": [float(p) for p in self.probs],
        }

    def state_dict(self) -> dict:
        """Position in the global row stream: plain ints, lists and strings (JSON-safe)."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "global_row": int(self._global),
            "source_pos": [[int(e), int(r)] for e, r in self._pos],
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly after the last batch of the run that saved `sd`. The batch size
        and world size may differ; data, seed, seq_len, packing and mixture may not."""
        if sd.get("version") != STATE_VERSION:
            raise UsageError(f"loader state version {sd.get('version')} is not {STATE_VERSION}")
        mine = self._identity()
        diff = [
            f"{k}: saved {sd.get(k)!r}, now {v!r}"
            for k, v in mine.items()
            if k != "probs" and sd.get(k) != v
        ]
        if not diff and not np.allclose(sd.get("probs", []), mine["probs"]):
            diff.append(f"probs: saved {sd.get('probs')}, now {mine['probs']}")
        if diff:
            raise UsageError(
                "cannot resume the data loader exactly, the setup changed ("
                + "; ".join(diff)
                + "). Resume with the same data and settings, or start a new run."
            )
        self._global = int(sd["global_row"])
        self._pos = [[int(e), int(r)] for e, r in sd["source_pos"]]
        self._resumed = True
