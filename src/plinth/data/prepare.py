"""Prepare a dataset: read sources, clean and filter, deduplicate, split, train the tokenizer,
tokenize in worker processes and write shards plus a manifest.

    plinth data prepare quickstart data.dir=data/qs
    python -c "from plinth.config.load import load_config; from plinth.data import \
prepare_dataset; prepare_dataset(load_config(['quickstart']).config)"

Stages (each streams; only per-document metadata is held in memory), each returning a small
result the next ones and the manifest take:

1. read + clean (plinth.data.clean, workers): sources yield documents; workers normalise,
   filter, drop documents sharing a word n-gram with the `data.decontaminate` evaluation sets
   (reason `contaminated`, see plinth.data.decontam), scrub PII and compute exact hashes and
   MinHash signatures; the main process keeps the first document of every exact/near-duplicate
   cluster and appends survivors to a temporary text store (plinth.data.store).
2. split: documents are held out for validation per source, seeded by `cfg.seed`.
3. tokenizer (plinth.data.tokenizer): trained on (a seeded sample of) the training documents,
   or loaded.
4. tokenize (plinth.data.encode, workers): documents are encoded in order and written to
   `train_*.bin` and `val_*.bin` shards (see plinth.data.shards), then `manifest.json`
   (plinth.data.manifest).

Everything is built in a temporary sibling directory and moved into `data.dir` at the end, so
an interrupted run never damages a dataset that was already there; what a killed run leaves
behind is removed (or put back) by the next one (`recover_leftovers`). The output depends only on
the data config, the seed and the inputs, never on `workers`. A directory whose manifest
records the same config fingerprint is reused without work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from plinth.data import filters as flt
from plinth.data import sources as srcs
from plinth.data import tokenizer as tkz
from plinth.data.clean import decontam_spec, read_sources
from plinth.data.encode import write_shards
from plinth.data.layout import FORMAT, FORMAT_VERSION, MANIFEST, TOKENIZER
from plinth.data.manifest import build_manifest, write_manifest
from plinth.data.paths import read_regular
from plinth.data.shards import file_sha256
from plinth.data.store import TextStore
from plinth.data.workers import WorkerPool
from plinth.errors import PlinthError, UsageError
from plinth.track.progress import TaskProgress

if TYPE_CHECKING:
    from plinth.config.schema import Config


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
        extra[key] = file_sha256(p)[:16] if path and p.is_file() else None
    budget, bounded = tkz.train_budget(cfg.data.tokenizer)
    if bounded and not cfg.data.tokenizer.path:  # datasets of other kinds keep their hash
        extra["tokenizer_sample_bytes"] = budget
    if cfg.data.decontaminate:
        try:
            extra["decontaminate_files"] = decontam_spec(cfg.data, build=False)[2]
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


def is_current(out: Path, fingerprint: str) -> bool:
    """True when `out` holds a complete dataset prepared from the same config fingerprint."""
    try:
        manifest = json.loads(read_regular(out / MANIFEST))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(manifest, dict):
        return False
    if manifest.get("config_fingerprint") != fingerprint or not (out / TOKENIZER).is_file():
        return False
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            p = out / shard["file"]
            if not p.is_file() or p.stat().st_size != shard["bytes"]:
                return False
    return True


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
    else:
        tkz.tokenizer_file(tc.path)  # a missing file or a FIFO fails before any reading
    settings = flt.FilterSettings.from_config(data.filters)
    decontam_spec(data)  # bad evaluation sets fail here; the index is built before workers fork

    for line in recover_leftovers(out):
        TaskProgress(progress).log(line)
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
            not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())
        )
        if foreign:
            raise UsageError(
                f"data.dir={out} exists and is not a plinth dataset (no {MANIFEST}); refusing "
                "to replace it. Point data.dir at a new or empty directory, or remove it."
            )
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / TMP_MARKER).write_text("a plinth data prepare build; removed by the next run\n")
        pool = WorkerPool(data.workers)
        try:
            with TaskProgress(progress) as prog:
                manifest = _build(cfg, tmp, names, settings, fingerprint, pool, prog)
            (tmp / TMP_MARKER).unlink()
            _publish(tmp, out)
        finally:
            pool.close()
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        TaskProgress(True).log(
            f"prepared {out}: {manifest['splits']['train']['tokens']:,} train / "
            f"{manifest['splits']['val']['tokens']:,} val tokens, fingerprint "
            f"{manifest['fingerprint']}"
        )
    return out


def resume_dataset(cfg: Config, recorded: str | None, what: str, progress: bool = True) -> Path:
    """The dataset a resumed run continues on. A complete dataset in `data.dir` is used as it
    is, never rebuilt or replaced, even when the inputs changed since (the run trained on it);
    a missing or damaged one is prepared. UsageError, before anything is written, when its
    content fingerprint is not `recorded` (the one `what`, the run, was started on)."""
    from plinth.data.dataset import open_dataset

    out = Path(cfg.data.dir)
    try:
        ds = open_dataset(out)
    except PlinthError:
        ds = None
    if ds is not None:
        _check_recorded(out, ds.fingerprint, recorded, what)
        if ds.manifest.get("config_fingerprint") != config_fingerprint(cfg):
            TaskProgress(True).log(
                f"the inputs of {out} changed since it was prepared; {what} continues on the "
                "dataset it started with (it is not rebuilt)"
            )
        return out
    path = prepare_dataset(cfg, progress=progress)
    _check_recorded(out, open_dataset(path).fingerprint, recorded, what)
    return path


def _check_recorded(out: Path, found: str, recorded: str | None, what: str) -> None:
    if recorded is not None and found != recorded:
        raise UsageError(
            f"data.dir={out} holds dataset {found}, but {what} was trained on dataset "
            f"{recorded}: resuming would continue on different data. Put the original "
            "dataset back (prepare it from the same inputs), or start a new run."
        )


@contextmanager
def _lock(out: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock next to `out` (POSIX flock; a no-op where unavailable).
    Yields whether it is held: without `wait`, False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield True
        return
    path = out.parent / f".{out.name}.lock"
    not_a_file = UsageError(
        f"{path} (the lock file of data.dir) is not a regular file; remove it and run again."
    )
    if os.path.lexists(path) and not os.path.isfile(path):
        raise not_a_file
    try:  # non-blocking: a FIFO planted at the lock's name must not hang the open
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UsageError(
            f"cannot create the lock file {path} next to data.dir ({e.strerror}); make the "
            "directory writable, or remove whatever is at that name."
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped in since the check
        os.close(fd)
        raise not_a_file
    with os.fdopen(fd, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# a killed build leaves `.NAME.tmp-PID` (the build, marked by TMP_MARKER) or, killed while
# publishing, `.NAME.old-PID` (the previous dataset, moved aside); nothing else is touched
TMP_MARKER = ".plinth-building"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-\d+")
_BUILD_FILES = re.compile(
    r"clean\.txt|tokenizer\.json|manifest\.json(\.tmp)?|(train|val)_\d+\.bin(\.tmp)?"
)


def _is_ours(d: Path, kind: str) -> bool:
    """A leftover directory plinth wrote: a marked build (or one from before the marker,
    holding only build files), or a moved-aside dataset (its manifest says so)."""
    if d.is_symlink() or not d.is_dir():
        return False
    if kind == "old":
        try:
            return json.loads((d / MANIFEST).read_text(encoding="utf-8"))["format"] == FORMAT
        except (OSError, ValueError, KeyError, TypeError):
            return False
    if (d / TMP_MARKER).is_file():
        return True
    names = [f.name for f in d.iterdir()]
    return all(_BUILD_FILES.fullmatch(n) for n in names)  # empty: killed right after mkdir


def recover_leftovers(out: Path) -> list[str]:
    """Clean up after a `data prepare` that was killed (kill -9, power loss): its temporary
    build directories next to `out` are removed, and a dataset it had moved aside while
    publishing is put back when `out` is missing. Only when no other process is preparing
    `out` (its lock is free). Returns one line per action."""
    if not out.parent.is_dir():
        return []
    lines: list[str] = []
    with _lock(out, wait=False) as held:
        if not held:
            return []
        found = []
        for d in sorted(out.parent.iterdir(), key=lambda p: p.name):
            m = _LEFTOVER.fullmatch(d.name)
            if m and m["name"] == out.name and _is_ours(d, m["kind"]):
                found.append((d, m["kind"]))
        if not out.exists():
            moved = [d for d, kind in found if kind == "old"]
            if moved:
                newest = max(moved, key=lambda p: p.stat().st_mtime)
                os.rename(newest, out)
                found.remove((newest, "old"))
                lines.append(f"restored {out} from {newest.name} (left by a killed run)")
        for d, kind in found:
            shutil.rmtree(d, ignore_errors=True)
            what = "build" if kind == "tmp" else "copy of a replaced dataset"
            lines.append(f"removed {d} (a temporary {what} left by a killed run)")
    return lines


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


def _build(cfg: Config, tmp: Path, names, settings, fingerprint, pool: WorkerPool, prog) -> dict:
    """Run the stages into `tmp`; returns the manifest (also written there)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    read = read_sources(cfg.data, settings, names, TextStore(tmp / "clean.txt"), pool, prog)
    timings["read_clean_dedup_s"] = time.perf_counter() - t0
    is_val = _split(read.corpus.source, len(names), cfg.data.val_fraction, cfg.seed)

    t1 = time.perf_counter()
    tok = tkz.dataset_tokenizer(cfg, read.corpus, is_val, tmp, prog)
    timings["tokenizer_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    shards = write_shards(tok.tokenizer, tok.path, read.corpus, is_val, names, tmp, pool, prog)
    timings["tokenize_s"] = time.perf_counter() - t2
    read.corpus.path.unlink()
    timings["total_s"] = time.perf_counter() - t0

    manifest = build_manifest(cfg, fingerprint, read, tok, shards, timings)
    write_manifest(tmp / MANIFEST, manifest)
    return manifest


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
