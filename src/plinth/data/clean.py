"""Stage 1 of `prepare_dataset`: read the sources, clean and filter, decontaminate, deduplicate.

Workers normalise and filter batches of one source's documents, drop documents sharing a word
n-gram with the `data.decontaminate` evaluation sets (reason `contaminated`, see
plinth.data.decontam), scrub PII and compute exact keys and MinHash signatures. The main
process takes the results in order, keeps the first document of every exact/near-duplicate
cluster (plinth.data.dedup), applies the `data.max_docs` / `data.max_bytes` caps and appends
survivors to the text store (plinth.data.store). Nothing is dropped without a count: every
reason is counted per source, with the first few examples.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from plinth.data import dedup as dd
from plinth.data import filters as flt
from plinth.data import sources as srcs
from plinth.data.decontam import NgramIndex, files_digest, load_eval_sets
from plinth.data.store import Corpus, TextStore
from plinth.data.workers import WorkerPool
from plinth.errors import UsageError

_CLEAN_BATCH_DOCS, _CLEAN_BATCH_BYTES = 256, 1 << 20
_EXAMPLES = 5  # bad-input / drop examples kept per source and reason
KEPT, BAD, FILTERED = 0, 1, 2  # status of a document coming back from a worker


# -------------------------------------------------------------------------- decontamination


_DECONTAM_INDEX: dict[tuple, NgramIndex] = {}


def decontam_spec(data, build: bool = True) -> tuple | None:
    """(paths, n, digest of the evaluation files) for `data.decontaminate`, or None. With
    build, the n-gram index is built now (UsageError for unreadable sets) and cached, so
    forked workers inherit it; spawned ones rebuild it from the files once."""
    if not data.decontaminate:
        return None
    spec = (tuple(data.decontaminate), data.decontaminate_ngram, files_digest(data.decontaminate))
    if build:
        decontam_index(spec)
    return spec


def decontam_index(spec: tuple) -> NgramIndex:
    """The n-gram index of the evaluation sets named by a `decontam_spec` (cached)."""
    index = _DECONTAM_INDEX.get(spec)
    if index is None:
        index = NgramIndex.build(load_eval_sets(spec[0]), spec[1])
        _DECONTAM_INDEX.clear()
        _DECONTAM_INDEX[spec] = index
    return index


@dataclass(frozen=True)
class DecontamResult:
    """The evaluation sets training documents were checked against (the manifest's
    `decontamination` section)."""

    eval_sets: dict[str, int]  # set name -> examples
    ngram: int  # words per n-gram
    ngrams: int  # distinct evaluation n-grams
    too_short: int  # examples with fewer than `ngram` words (not checkable)
    removed: int  # training documents dropped as `contaminated`


# ---------------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class CleanParams:
    filters: flt.FilterSettings
    exact: bool
    near: bool
    num_perm: int
    shingle: int
    decontam: tuple | None = None  # (eval set paths, n, contents digest): see decontam_spec


def clean_batch(params: CleanParams, items: list[srcs.RawDoc]) -> dict:
    """Worker: run deferred transforms, clean and filter a batch of one source's items, in
    order; exact keys and MinHash signatures for the survivors. Each item comes back as
    (status, reason, ref, detail, nbytes, text, digest of the input as read, PII counts). The
    PII counts travel with each document because dedup and the caps may still drop it: only
    kept documents are counted."""
    rows = []
    for raw in items:
        digest = hashlib.blake2b(
            f"{raw.ref}\0{raw.reason or ''}\0".encode()
            + (raw.text or "").encode("utf-8", "surrogatepass"),
            digest_size=16,
        ).digest()
        doc = srcs.apply_transform(raw)
        if doc.text is None:
            rows.append((BAD, doc.reason, doc.ref, doc.detail, doc.nbytes, None, digest, {}))
            continue
        clean, reason, counts = flt.clean_document(doc.text, params.filters)
        if reason:
            rows.append((FILTERED, reason, doc.ref, "", doc.nbytes, None, digest, {}))
            continue
        if params.decontam is not None:
            hit = decontam_index(params.decontam).first_match(clean)
            if hit is not None:
                rows.append(
                    (FILTERED, "contaminated", doc.ref, hit, doc.nbytes, None, digest, {})
                )
                continue
        rows.append((KEPT, None, doc.ref, "", doc.nbytes, clean, digest, counts))
    kept = [r[5] for r in rows if r[0] == KEPT]
    keys = [dd.exact_key(t) for t in kept] if params.exact else None
    sigs = dd.minhash_signatures(kept, params.num_perm, params.shingle) if params.near else None
    return {"rows": rows, "keys": keys, "sigs": sigs}


# ------------------------------------------------------------------------------ bookkeeping


@dataclass
class SourceStats:
    """What happened to one source's documents (the manifest's `sources[i]` counts)."""

    name: str
    read: int = 0
    bytes_read: int = 0
    bad_input: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    kept_bytes: int = 0
    pii: Counter = field(default_factory=Counter)  # scrubbed items in kept documents
    capped: str | None = None
    examples: dict = field(default_factory=dict)
    sha: Any = field(default_factory=hashlib.sha256)

    def example(self, reason: str, ref: str, detail: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES:
            ex.append(f"{ref}: {detail}" if detail else ref)


@dataclass(frozen=True)
class ReadResult:
    """Stage 1's output: the surviving documents and what happened to the rest."""

    sources: list[SourceStats]
    settings: flt.FilterSettings  # the filters the documents went through
    corpus: Corpus
    dedup: dd.DedupResult
    decontam: DecontamResult | None
    warnings: list[str]  # one line per reported bad-input reason


# ------------------------------------------------------------------------------------ stage


def read_sources(
    data, settings: flt.FilterSettings, names: list[str], store: TextStore, pool: WorkerPool, prog
) -> ReadResult:
    """Stream every source through the workers into `store`; UsageError when no document
    survives."""
    stats = [SourceStats(n) for n in names]
    params = CleanParams(
        settings,
        data.dedup.exact,
        data.dedup.near,
        data.dedup.num_perm,
        data.dedup.shingle,
        decontam_spec(data),
    )
    dedup = dd.CorpusDedup(
        data.dedup.exact, data.dedup.near, data.dedup.threshold, data.dedup.num_perm
    )
    task = prog.task("read + clean")
    # Caps are applied here, on results in order, so what counts as read never depends on how
    # far ahead the workers got; `stop` tells the reader to move on to the next source.
    stop = [False] * len(stats)
    order: deque[int] = deque()  # source of each submitted batch (results come back in order)
    for res in pool.map(clean_batch, _batches(data, params, stop, order)):
        si = order.popleft()
        if stop[si]:  # a batch submitted before the cap was reached
            continue
        stop[si] = _take_batch(res, stats[si], si, data, dedup, store, prog)
        prog.update(
            task,
            completed=sum(s.read for s in stats),
            info=f"{sum(s.bytes_read for s in stats) / 1e6:.1f} MB, kept "
            f"{sum(s.kept for s in stats):,}",
        )
    corpus = store.finish()
    warnings = _bad_input_warnings(stats)
    if len(corpus) == 0:
        raise UsageError(_nothing_left_message(stats))
    decontam = None
    if params.decontam is not None:
        index = decontam_index(params.decontam)
        decontam = DecontamResult(
            eval_sets=dict(zip(index.set_names, index.set_sizes, strict=True)),
            ngram=index.n,
            ngrams=len(index),
            too_short=sum(index.too_short),
            removed=sum(st.filtered["contaminated"] for st in stats),
        )
    return ReadResult(stats, settings, corpus, dedup.result(), decontam, warnings)


def _batches(data, params: CleanParams, stop: list[bool], order: deque) -> Iterator[tuple]:
    """Worker tasks: (params, batch of one source's raw documents), sources in order."""
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


def _take_batch(
    res: dict, st: SourceStats, si: int, data, dedup: dd.CorpusDedup, store: TextStore, prog
) -> bool:
    """Count, dedup and store one worker result of source `si`; True once a cap is reached
    (the rest of the batch is not read)."""
    bands = dedup.band_keys(res["sigs"]) if res["sigs"] is not None else None
    k = -1  # index among this batch's filter survivors (keys/sigs are aligned to them)
    for status, reason, ref, detail, nbytes, text, digest, pii in res["rows"]:
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
            verdict = dedup.check(
                res["keys"][k] if res["keys"] is not None else None,
                res["sigs"][k] if bands is not None else None,
                bands[k] if bands is not None else None,
            )
            if verdict == "exact":
                st.exact_duplicates += 1
                st.example("exact_duplicate", ref, "")
            elif verdict == "near":
                st.near_duplicates += 1
                st.example("near_duplicate", ref, "")
            else:
                st.kept_bytes += store.add(text, si)
                st.kept += 1
                st.pii.update(pii)
        if data.max_docs and st.read >= data.max_docs:
            st.capped = f"max_docs={data.max_docs}"
            return True
        if data.max_bytes and st.bytes_read >= data.max_bytes:
            st.capped = f"max_bytes={data.max_bytes}"
            return True
    return False


def _bad_input_warnings(stats: list[SourceStats]) -> list[str]:
    warnings = []
    for st in stats:
        for reason, n in sorted(st.bad_input.items()):
            if reason in srcs.QUIET_REASONS:
                continue
            ex = st.examples.get(reason, [""])[0]
            warnings.append(f"{st.name}: {n} input(s) skipped as {reason} (e.g. {ex})")
    return warnings


def _nothing_left_message(stats: list[SourceStats]) -> str:
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
