"""Prepare a dataset: read sources, clean and filter, deduplicate, split, train the tokenizer,
tokenize in worker processes and write shards plus a manifest.

    plinth data prepare quickstart data.dir=data/qs
    python -c "from plinth.config.load import load_config; from plinth.data import \
prepare_dataset; prepare_dataset(load_config(['quickstart']).config)"

Stages (each streams; only per-document metadata is held in memory):

1. read + clean (workers): sources yield documents; workers normalise, filter, drop documents
   sharing a word n-gram with the `data.decontaminate` evaluation sets (reason `contaminated`,
   see plinth.eval.decontam), scrub PII and compute exact hashes and MinHash signatures; the
   main process keeps the first document of every exact/near-duplicate cluster and appends
   survivors to a temporary text store.
2. split: documents are held out for validation per source, seeded by `cfg.seed`.
3. tokenizer: trained on (a seeded sample of) the training documents, or loaded.
4. tokenize (workers): documents are encoded in order and written to `train_*.bin` and
   `val_*.bin` shards (see plinth.data.shards), then `manifest.json`.

Everything is built in a temporary sibling directory and moved into `data.dir` at the end, so
an interrupted run never damages a dataset that was already there. The output depends only on
the data config, the seed and the inputs, never on `workers`. A directory whose manifest
records the same config fingerprint is reused without work.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plinth.data import dedup as dd
from plinth.data import filters as flt
from plinth.data import sources as srcs
from plinth.data import tokenizer as tkz
from plinth.data.shards import ShardWriter, itemsize_for
from plinth.errors import UsageError
from plinth.track.progress import TaskProgress

if TYPE_CHECKING:
    from plinth.config.schema import Config

FORMAT = "plinth-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB as uint16)
_CLEAN_BATCH_DOCS, _CLEAN_BATCH_BYTES = 256, 1 << 20
_TOKENIZE_BATCH_BYTES = 1 << 20
_EXAMPLES = 5  # bad-input / drop examples kept per source and reason


# ------------------------------------------------------------------------------ fingerprint


def config_fingerprint(cfg: Config) -> str:
    """Hash of everything that decides the prepared data: the data config (minus where it is
    written, worker count and packing, which do not change the shards), the seed, the vocab
    size, a stat signature of every input, and the contents of referenced files."""
    skip = {"dir", "workers", "packing"}
    if not cfg.data.decontaminate:  # fingerprints of datasets from before the option hold
        skip |= {"decontaminate", "decontaminate_ngram"}
    data = cfg.data.model_dump(mode="json", exclude=skip)
    extra = {}
    for key, path in (
        ("tokenizer_file", cfg.data.tokenizer.path),
        ("blocklist_file", cfg.data.filters.blocklist),
    ):
        p = Path(path) / TOKENIZER if path and Path(path).is_dir() else Path(path or "")
        extra[key] = _file_digest(p) if path and p.is_file() else None
    if cfg.data.decontaminate:
        try:
            extra["decontaminate_files"] = _decontam_spec(cfg.data, build=False)[2]
        except UsageError:  # reported by prepare_dataset
            extra["decontaminate_files"] = None
    payload = {
        "format_version": FORMAT_VERSION,
        "data": data,
        "seed": cfg.seed,
        "vocab_size": cfg.tokenizer_vocab_size,
        "inputs": [srcs.stat_signature(s) for s in cfg.data.sources],
        **extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    from plinth.data.shards import file_sha256

    return file_sha256(path)[:16]


def is_current(out: Path, fingerprint: str) -> bool:
    """True when `out` holds a complete dataset prepared from the same config fingerprint."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("config_fingerprint") != fingerprint or not (out / TOKENIZER).is_file():
        return False
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            p = out / shard["file"]
            if not p.is_file() or p.stat().st_size != shard["bytes"]:
                return False
    return True


# ------------------------------------------------------------------------------- progress


# -------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _CleanParams:
    filters: flt.FilterSettings
    exact: bool
    near: bool
    num_perm: int
    shingle: int
    decontam: tuple | None = None  # (eval set paths, n, contents digest): see _decontam_spec


KEPT, BAD, FILTERED = 0, 1, 2


def _clean_batch(params: _CleanParams, items: list[srcs.RawDoc]) -> dict:
    """Worker stage 1 on a batch of one source's items, in order: run deferred transforms,
    clean and filter; exact keys and MinHash signatures for the survivors. Each item comes back
    as (status, reason, ref, detail, nbytes, text, digest of the input as read)."""
    rows = []
    pii: Counter = Counter()
    for raw in items:
        digest = hashlib.blake2b(
            f"{raw.ref}\0{raw.reason or ''}\0".encode()
            + (raw.text or "").encode("utf-8", "surrogatepass"),
            digest_size=16,
        ).digest()
        doc = srcs.apply_transform(raw)
        if doc.text is None:
            rows.append((BAD, doc.reason, doc.ref, doc.detail, doc.nbytes, None, digest))
            continue
        clean, reason, counts = flt.clean_document(doc.text, params.filters)
        if reason:
            rows.append((FILTERED, reason, doc.ref, "", doc.nbytes, None, digest))
            continue
        if params.decontam is not None:
            hit = _decontam_index(params.decontam).first_match(clean)
            if hit is not None:
                rows.append((FILTERED, "contaminated", doc.ref, hit, doc.nbytes, None, digest))
                continue
        pii.update(counts)
        rows.append((KEPT, None, doc.ref, "", doc.nbytes, clean, digest))
    kept = [r[5] for r in rows if r[0] == KEPT]
    keys = [dd.exact_key(t) for t in kept] if params.exact else None
    sigs = dd.minhash_signatures(kept, params.num_perm, params.shingle) if params.near else None
    return {"rows": rows, "pii": dict(pii), "keys": keys, "sigs": sigs}


_WORKER_TOKENIZERS: dict[str, Any] = {}
_DECONTAM_INDEX: dict[tuple, Any] = {}


def _decontam_spec(data, build: bool = True) -> tuple | None:
    """(paths, n, digest of the evaluation files) for `data.decontaminate`, or None. With
    build, the n-gram index is built now (UsageError for unreadable sets) and cached, so
    forked workers inherit it; spawned ones rebuild it from the files once."""
    if not data.decontaminate:
        return None
    from plinth.eval.decontam import files_digest  # stdlib-only module; imported on demand

    spec = (tuple(data.decontaminate), data.decontaminate_ngram, files_digest(data.decontaminate))
    if build:
        _decontam_index(spec)
    return spec


def _decontam_index(spec: tuple):
    """The n-gram index of the evaluation sets named by a `_decontam_spec` (cached)."""
    index = _DECONTAM_INDEX.get(spec)
    if index is None:
        from plinth.eval.decontam import NgramIndex, load_eval_sets

        index = NgramIndex.build(load_eval_sets(spec[0]), spec[1])
        _DECONTAM_INDEX.clear()
        _DECONTAM_INDEX[spec] = index
    return index


def _tokenize_batch(tok_path: str, store_path: str, spans: list[tuple[int, int]], dtype) -> tuple:
    """Worker stage 2: encode documents read from the text store; (flat ids, lengths)."""
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


def encode_texts(tok, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encs]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _worker_init() -> None:
    # each worker is one core; the library's own thread pool would oversubscribe the CPUs
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _Runner:
    """Ordered map over tasks: in-process for one worker, else a process pool with a bounded
    number of tasks in flight (back-pressure, so reading never runs ahead of memory).

    Workers are forked where the OS can (instant start, and scripts calling prepare_dataset
    need no `if __name__ == "__main__":` guard); they only run numpy, regexes and the Rust
    tokenizer, never torch, so fork is safe here. Elsewhere they are spawned."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(workers, initializer=_worker_init)

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        if self.pool is None:
            for args in tasks:
                yield fn(*args)
            return
        pending: deque = deque()
        for args in tasks:
            pending.append(self.pool.apply_async(fn, args))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------------------- bookkeeping


@dataclass
class _SourceStats:
    name: str
    read: int = 0
    bytes_read: int = 0
    bad_input: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    kept_bytes: int = 0
    pii: Counter = field(default_factory=Counter)
    capped: str | None = None
    examples: dict = field(default_factory=dict)
    sha: Any = field(default_factory=hashlib.sha256)

    def example(self, reason: str, ref: str, detail: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES:
            ex.append(f"{ref}: {detail}" if detail else ref)


class _TextStore:
    """Append-only file of UTF-8 documents plus their byte spans (kept in memory)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.ends: list[int] = []
        self.sources: list[int] = []
        self._pos = 0

    def add(self, text: str, source: int) -> int:
        b = text.encode("utf-8")
        self._f.write(b)
        self._pos += len(b)
        self.ends.append(self._pos)
        self.sources.append(source)
        return len(b)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._f.close()
        ends = np.asarray(self.ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        return starts, ends


# ------------------------------------------------------------------------------- pipeline


def prepare_dataset(cfg: Config, progress: bool = True, force: bool = False) -> Path:
    """Build (or reuse) the dataset described by `cfg.data` in `cfg.data.dir`; returns the dir.

    Raises UsageError for bad configuration and when no document survives; bad input files,
    records and lines are skipped, counted in the manifest and reported, never fatal."""
    data = cfg.data
    out = Path(data.dir)
    names = srcs.source_names(data.sources)
    if not data.sources:
        raise UsageError("data.sources is empty; add at least one source (e.g. kind: stdlib_code)")
    for i, s in enumerate(data.sources):
        srcs.check_source_config(s, f"data.sources[{i}]")
    tc = data.tokenizer
    vocab_key = "data.tokenizer.vocab_size" if tc.vocab_size else "model.vocab_size"
    if tc.path is None:
        tkz.check_vocab(tc.kind, cfg.tokenizer_vocab_size, tc.special_tokens, vocab_key)
    settings = flt.FilterSettings.from_config(data.filters)
    _decontam_spec(data)  # bad evaluation sets fail here; the index is built before workers fork

    fingerprint = config_fingerprint(cfg)
    if not force and is_current(out, fingerprint):
        if progress:
            TaskProgress(True).log(f"dataset in {out} is up to date (config {fingerprint}); reused")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out):  # several processes (e.g. torchrun ranks) may prepare the same dir
        if not force and is_current(out, fingerprint):  # another one just built it
            return out
        foreign = out.exists() and (
            not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())
        )
        if foreign:
            raise UsageError(
                f"data.dir={out} exists and is not a plinth dataset (no {MANIFEST}); refusing "
                "to replace it. Point data.dir at a new or empty directory, or remove it."
            )
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        runner = _Runner(data.workers)
        try:
            with TaskProgress(progress) as prog:
                manifest = _build(cfg, tmp, names, settings, fingerprint, runner, prog)
            _publish(tmp, out)
        finally:
            runner.close()
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        TaskProgress(True).log(
            f"prepared {out}: {manifest['splits']['train']['tokens']:,} train / "
            f"{manifest['splits']['val']['tokens']:,} val tokens, fingerprint "
            f"{manifest['fingerprint']}"
        )
    return out


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive advisory lock next to `out` (POSIX flock; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = out.parent / f".{out.name}.lock"
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished build into place; the old dataset is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(cfg, tmp: Path, names, settings, fingerprint, runner: _Runner, prog) -> dict:
    data, tc = cfg.data, cfg.data.tokenizer
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    stats = [_SourceStats(n) for n in names]
    store = _TextStore(tmp / "clean.txt")

    # ---- stage 1: read, clean, dedup ---------------------------------------------------
    params = _CleanParams(
        settings,
        data.dedup.exact,
        data.dedup.near,
        data.dedup.num_perm,
        data.dedup.shingle,
        _decontam_spec(data),
    )
    seen_exact: dict[bytes, int] = {}
    exact_clusters: Counter = Counter()
    near = dd.NearDedup(data.dedup.threshold, data.dedup.num_perm) if data.dedup.near else None
    task = prog.task("read + clean")
    # Caps are applied here, on results in order, so what counts as read never depends on how
    # far ahead the workers got; `stop` tells the reader to move on to the next source.
    stop = [False] * len(stats)
    order: deque[int] = deque()  # source of each submitted batch (results come back in order)

    def tasks() -> Iterator[tuple]:
        for si, src in enumerate(data.sources):
            items: list[srcs.RawDoc] = []
            size = 0
            for raw in srcs.open_source(src, data.max_doc_bytes):
                if stop[si]:
                    break
                items.append(raw)
                size += raw.nbytes
                if len(items) >= _CLEAN_BATCH_DOCS or size >= _CLEAN_BATCH_BYTES:
                    order.append(si)
                    yield params, items
                    items, size = [], 0
            if items and not stop[si]:
                order.append(si)
                yield params, items

    for res in runner.map(_clean_batch, tasks()):
        si = order.popleft()
        st = stats[si]
        if stop[si]:
            continue
        keys = near.band_keys(res["sigs"]) if near is not None and len(res["sigs"]) else None
        k = -1  # index among this batch's filter survivors (keys/sigs are aligned to them)
        for status, reason, ref, detail, nbytes, text, digest in res["rows"]:
            st.sha.update(digest)
            if status == BAD:
                st.bad_input[reason] += 1
                st.example(reason, ref, detail)
                if reason not in srcs.QUIET_REASONS and st.bad_input[reason] <= 2:
                    prog.log(f"warning: {st.name}: skipped {ref}: {detail}")
                continue
            st.read += 1
            st.bytes_read += nbytes
            if status == FILTERED:
                st.filtered[reason] += 1
                st.example(reason, ref, detail)
            else:
                k += 1
                self_dup = None
                if params.exact:
                    key = res["keys"][k]
                    if key in seen_exact:
                        self_dup = "exact"
                        exact_clusters[seen_exact[key]] += 1
                    else:
                        seen_exact[key] = len(seen_exact)
                if (
                    self_dup is None
                    and near is not None
                    and near.add_with_keys(res["sigs"][k], keys[k]) is not None
                ):
                    self_dup = "near"
                if self_dup == "exact":
                    st.exact_duplicates += 1
                    st.example("exact_duplicate", ref, "")
                elif self_dup == "near":
                    st.near_duplicates += 1
                    st.example("near_duplicate", ref, "")
                else:
                    st.kept_bytes += store.add(text, si)
                    st.kept += 1
            if data.max_docs and st.read >= data.max_docs:
                st.capped, stop[si] = f"max_docs={data.max_docs}", True
            elif data.max_bytes and st.bytes_read >= data.max_bytes:
                st.capped, stop[si] = f"max_bytes={data.max_bytes}", True
            if stop[si]:
                break
        prog.update(
            task,
            completed=sum(s.read for s in stats),
            info=f"{sum(s.bytes_read for s in stats) / 1e6:.1f} MB, kept "
            f"{sum(s.kept for s in stats):,}",
        )
    starts, ends = store.finish()
    doc_source = np.asarray(store.sources, dtype=np.int64)
    n_docs = len(ends)
    timings["read_clean_dedup_s"] = time.perf_counter() - t0

    for st in stats:
        for reason, n in sorted(st.bad_input.items()):
            if reason in srcs.QUIET_REASONS:
                continue
            ex = st.examples.get(reason, [""])[0]
            warnings.append(f"{st.name}: {n} input(s) skipped as {reason} (e.g. {ex})")
    if n_docs == 0:
        raise UsageError(_nothing_left_message(stats))

    # ---- stage 2: split -----------------------------------------------------------------
    is_val = _split(doc_source, len(stats), data.val_fraction, cfg.seed)

    # ---- stage 3: tokenizer ----------------------------------------------------------------
    t1 = time.perf_counter()
    tok_info: dict[str, Any] = {"kind": tc.kind}
    if tc.path:
        tok, added = tkz.load_tokenizer(tc.path, tc.special_tokens)
        tok_info.update(loaded_from=str(tc.path), added_special_tokens=added)
        if added:
            warnings.append(
                f"tokenizer {tc.path} lacked {added}; they were added with new ids (set "
                "data.tokenizer.special_tokens to tokens it has to avoid this)"
            )
        if tok.get_vocab_size() > cfg.model.vocab_size:
            warnings.append(
                f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}; raise model.vocab_size to at least the tokenizer's"
            )
    else:
        ttask = prog.task("train tokenizer")
        train_idx = np.flatnonzero(~is_val)
        rng = np.random.default_rng([cfg.seed, 0x70C])
        sample = rng.permutation(train_idx)
        if tc.train_max_bytes:
            sizes = (ends - starts)[sample]
            sample = sample[: int(np.searchsorted(np.cumsum(sizes), tc.train_max_bytes)) + 1]
        sample = np.sort(sample)  # read the store front to back
        tok = tkz.train_for_config(_store_texts(store.path, starts, ends, sample), cfg)
        tok_info["trained_on"] = {"docs": len(sample), "bytes": int((ends - starts)[sample].sum())}
        prog.update(ttask, total=1, completed=1, info=f"vocab {tok.get_vocab_size()}")
        n_sent = tkz.sentinel_count(
            tc.kind, cfg.tokenizer_vocab_size, len(tc.special_tokens), tc.sentinels
        )
        if n_sent < tc.sentinels:
            warnings.append(
                f"only {n_sent} of data.tokenizer.sentinels={tc.sentinels} sentinel tokens fit "
                f"a vocab of {cfg.tokenizer_vocab_size}"
            )
    tok_path = tmp / TOKENIZER
    tok.save(str(tok_path))
    roles = tkz.token_roles(tok, tc.special_tokens)
    vocab = tok.get_vocab_size()
    tok_info.update(
        file=TOKENIZER,
        vocab_size=vocab,
        sha256=tkz.tokenizer_hash(tok),
        special_tokens=list(tc.special_tokens),
        sentinels=len(roles["sentinel_ids"]),
        roles=roles,
    )
    timings["tokenizer_s"] = time.perf_counter() - t1

    # ---- stage 4: tokenize + shards ------------------------------------------------------
    t2 = time.perf_counter()
    splits = _tokenize_to_shards(
        tok,
        tok_path,
        store.path,
        starts,
        ends,
        doc_source,
        is_val,
        names,
        vocab,
        tmp,
        runner,
        prog,
    )
    timings["tokenize_s"] = time.perf_counter() - t2
    (tmp / "clean.txt").unlink()
    timings["total_s"] = time.perf_counter() - t0

    manifest = _manifest(
        cfg,
        names,
        stats,
        settings,
        seen_exact,
        exact_clusters,
        near,
        tok_info,
        splits,
        fingerprint,
        warnings,
        timings,
    )
    if params.decontam is not None:
        index = _decontam_index(params.decontam)
        manifest["decontamination"] = {
            "eval_sets": dict(zip(index.set_names, index.set_sizes, strict=True)),
            "ngram": index.n,
            "ngrams": len(index),
            "too_short": sum(index.too_short),
            "removed": sum(st.filtered["contaminated"] for st in stats),
        }
    _write_json(tmp / MANIFEST, manifest)
    return manifest


def _nothing_left_message(stats: list[_SourceStats]) -> str:
    parts = []
    for st in stats:
        reasons = st.bad_input + st.filtered
        if st.exact_duplicates:
            reasons["exact_duplicate"] = st.exact_duplicates
        if st.near_duplicates:
            reasons["near_duplicate"] = st.near_duplicates
        top = ", ".join(f"{r}: {n}" for r, n in reasons.most_common(4)) or "no input at all"
        ex = next(iter(st.examples.values()), [""])[0]
        parts.append(f"{st.name} read {st.read} documents ({top}{'; e.g. ' + ex if ex else ''})")
    return (
        "no document survived reading, filtering and dedup, so there is nothing to train on: "
        + "; ".join(parts)
        + ". Check data.sources (path, pattern, text_field) and loosen data.filters "
        "(e.g. data.filters.min_chars) if the filters dropped everything."
    )


def _split(doc_source: np.ndarray, n_sources: int, frac: float, seed: int) -> np.ndarray:
    """Validation mask: per source, round(n*frac) documents (at least one when the source has
    two or more and frac > 0), chosen with a generator seeded by the run's seed."""
    is_val = np.zeros(len(doc_source), dtype=bool)
    if frac <= 0:
        return is_val
    for s in range(n_sources):
        idx = np.flatnonzero(doc_source == s)
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, round(len(idx) * frac)))
        rng = np.random.default_rng([seed, 0x5A1, s])
        is_val[rng.choice(idx, size=k, replace=False)] = True
    return is_val


def _store_texts(path: Path, starts, ends, idx) -> Iterator[str]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for i in idx:
                yield m[starts[i] : ends[i]].decode("utf-8")


def _tokenize_to_shards(
    tok, tok_path, store_path, starts, ends, doc_source, is_val, names, vocab, tmp, runner, prog
) -> dict:
    dtype = np.dtype("<u2") if itemsize_for(vocab) == 2 else np.dtype("<u4")
    n_docs = len(starts)
    chunks = []  # contiguous doc ranges of about _TOKENIZE_BATCH_BYTES
    lo, acc = 0, 0
    for i in range(n_docs):
        acc += int(ends[i] - starts[i])
        if acc >= _TOKENIZE_BATCH_BYTES or i == n_docs - 1:
            chunks.append((lo, i + 1))
            lo, acc = i + 1, 0
    writers: dict[str, ShardWriter | None] = dict.fromkeys(SPLITS)
    info = {
        s: {
            "docs": 0,
            "tokens": 0,
            "bytes": 0,
            "shards": [],
            "sources": {n: {"docs": 0, "tokens": 0, "bytes": 0} for n in names},
        }
        for s in SPLITS
    }
    task = prog.task("tokenize", total=n_docs)

    def write(split: str, flat, lengths, src_ids, nbytes) -> None:
        w = writers[split]
        if w is None:
            w = writers[split] = ShardWriter(
                tmp / f"{split}_{len(info[split]['shards']):06d}.bin", vocab
            )
        w.add(flat, lengths, src_ids)
        if w.n_tokens >= SHARD_TOKENS:
            info[split]["shards"].append(w.close())
            writers[split] = None

    if runner.pool is None:
        tok.encode_special_tokens = True
        try:
            results = (
                encode_texts(tok, list(_store_texts(store_path, starts, ends, range(a, b))), dtype)
                for a, b in chunks
            )
            _consume(
                results, chunks, starts, ends, doc_source, is_val, names, info, write, prog, task
            )
        finally:
            tok.encode_special_tokens = False
    else:
        results = runner.map(
            _tokenize_batch,
            (
                (
                    str(tok_path),
                    str(store_path),
                    list(zip(starts[a:b].tolist(), ends[a:b].tolist(), strict=False)),
                    dtype,
                )
                for a, b in chunks
            ),
        )
        _consume(results, chunks, starts, ends, doc_source, is_val, names, info, write, prog, task)
    for split, w in writers.items():
        if w is not None:
            info[split]["shards"].append(w.close())
    for split in SPLITS:
        d = info[split]
        d["itemsize"] = dtype.itemsize
        d["bytes_per_token"] = d["bytes"] / d["tokens"] if d["tokens"] else None
    return info


def _consume(results, chunks, starts, ends, doc_source, is_val, names, info, write, prog, task):
    for (a, b), (flat, lengths) in zip(chunks, results, strict=False):
        nbytes = ends[a:b] - starts[a:b]
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
            src = doc_source[a:b][mask]
            write(split, sel_flat, lengths[mask], src, nbytes[mask])
            d = info[split]
            d["docs"] += int(mask.sum())
            d["tokens"] += int(lengths[mask].sum())
            d["bytes"] += int(nbytes[mask].sum())
            for s in np.unique(src).tolist():
                m = src == s
                per = d["sources"][names[s]]
                per["docs"] += int(m.sum())
                per["tokens"] += int(lengths[mask][m].sum())
                per["bytes"] += int(nbytes[mask][m].sum())
        prog.update(task, completed=b)


def _manifest(
    cfg,
    names,
    stats,
    settings,
    seen_exact,
    exact_clusters,
    near,
    tok_info,
    splits,
    fingerprint,
    warnings,
    timings,
) -> dict:
    from plinth import __version__

    data = cfg.data
    sources = []
    for src, st in zip(data.sources, stats, strict=False):
        sources.append(
            {
                "name": st.name,
                "kind": src.kind,
                "path": src.path,
                "text_field": (
                    src.text_field if src.kind in ("jsonl", "parquet", "hf_disk") else None
                ),
                "weight": src.weight,
                "content_sha256": st.sha.hexdigest(),
                "docs_read": st.read,
                "bytes_read": st.bytes_read,
                "capped_by": st.capped,
                "bad_input": dict(st.bad_input),
                "filtered": dict(st.filtered),
                "exact_duplicates": st.exact_duplicates,
                "near_duplicates": st.near_duplicates,
                "kept": st.kept,
                "kept_bytes": st.kept_bytes,
                "pii_scrubbed": dict(st.pii),
                "examples": st.examples,
            }
        )
    dropped = sum((st.filtered for st in stats), Counter())
    checked = sum(st.read for st in stats)
    shard_hashes = sorted(s["sha256"] for sp in splits.values() for s in sp["shards"])
    fp = hashlib.sha256(
        json.dumps([tok_info["sha256"], shard_hashes, [s["weight"] for s in sources]]).encode()
    ).hexdigest()[:16]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plinth_version": __version__,
        "python": sys.version.split()[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint": fp,
        "config_fingerprint": fingerprint,
        "seed": cfg.seed,
        "config": data.model_dump(mode="json"),
        "sources": sources,
        "bad_input": dict(sum((st.bad_input for st in stats), Counter())),
        "filters": {
            "settings": settings.describe(),
            "checked": checked,
            "kept": checked - sum(dropped.values()),
            "dropped": dict(dropped.most_common()),
        },
        "dedup": {
            "exact": {
                "enabled": data.dedup.exact,
                "removed": sum(st.exact_duplicates for st in stats),
                "clusters": len(exact_clusters),
            },
            "near": {
                "enabled": data.dedup.near,
                "threshold": data.dedup.threshold,
                "num_perm": data.dedup.num_perm,
                "shingle": data.dedup.shingle,
                "removed": sum(st.near_duplicates for st in stats),
                **(near.stats() if near is not None else {}),
            },
        },
        "tokenizer": tok_info,
        "splits": splits,
        "warnings": warnings,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
