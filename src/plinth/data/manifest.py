"""The manifest of a prepared dataset (`manifest.json`), assembled from the stage results of
`prepare_dataset`: counts, hashes, settings and fingerprints. docs/data.md lists its fields.

The content `fingerprint` hashes the tokenizer, the shards and the source weights, so two
datasets with the same fingerprint feed training the same tokens; `config_fingerprint` hashes
what the dataset was prepared from (see plinth.data.prepare.config_fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from plinth.data.clean import ReadResult, SourceStats
from plinth.data.encode import ShardResult
from plinth.data.layout import FORMAT, FORMAT_VERSION
from plinth.data.tokenizer import TokenizerResult

if TYPE_CHECKING:
    from plinth.config.schema import Config

_TEXT_FIELD_KINDS = ("jsonl", "parquet", "hf_disk")  # source kinds that read a `text_field`


def build_manifest(
    cfg: Config,
    fingerprint: str,
    read: ReadResult,
    tokenizer: TokenizerResult,
    shards: ShardResult,
    timings: dict[str, float],
) -> dict:
    """The manifest of a dataset built from `cfg` (whose config_fingerprint is `fingerprint`)
    by the stages that returned `read`, `tokenizer` and `shards`."""
    from plinth import __version__

    data = cfg.data
    sources = [_source(src, st) for src, st in zip(data.sources, read.sources, strict=False)]
    fp = hashlib.sha256(
        json.dumps(
            [tokenizer.info["sha256"], shards.shard_hashes, [s["weight"] for s in sources]]
        ).encode()
    ).hexdigest()[:16]
    manifest = {
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
        "bad_input": dict(sum((st.bad_input for st in read.sources), Counter())),
        "filters": _filters(read),
        "dedup": _dedup(cfg, read),
        "tokenizer": tokenizer.info,
        "splits": shards.splits,
        "warnings": read.warnings + tokenizer.warnings,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if read.decontam is not None:
        manifest["decontamination"] = dataclasses.asdict(read.decontam)
    return manifest


def _source(src, st: SourceStats) -> dict:
    return {
        "name": st.name,
        "kind": src.kind,
        "path": src.path,
        "text_field": src.text_field if src.kind in _TEXT_FIELD_KINDS else None,
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


def _filters(read: ReadResult) -> dict:
    dropped = sum((st.filtered for st in read.sources), Counter())
    checked = sum(st.read for st in read.sources)
    return {
        "settings": read.settings.describe(),
        "checked": checked,
        "kept": checked - sum(dropped.values()),
        "dropped": dict(dropped.most_common()),
    }


def _dedup(cfg: Config, read: ReadResult) -> dict:
    dd = cfg.data.dedup
    return {
        "exact": {
            "enabled": dd.exact,
            "removed": sum(st.exact_duplicates for st in read.sources),
            "clusters": read.dedup.exact_clusters,
        },
        "near": {
            "enabled": dd.near,
            "threshold": dd.threshold,
            "num_perm": dd.num_perm,
            "shingle": dd.shingle,
            "removed": sum(st.near_duplicates for st in read.sources),
            **read.dedup.near,
        },
    }


def write_manifest(path: Path, manifest: dict) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
