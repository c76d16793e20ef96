"""The data stage: sources -> filters -> dedup -> tokenizer -> shards -> packed batches.

    plinth data prepare quickstart        # then: plinth data inspect data/quickstart

    from plinth.data import prepare_dataset, open_dataset, PackedLoader
    path = prepare_dataset(cfg)                              # cfg: plinth.config.schema.Config
    ds = open_dataset(path)
    loader = PackedLoader(ds, "train", seq_len=256, batch_size=8, seed=cfg.seed)

Modules: sources (readers), filters (cleaning and quality checks), dedup (exact + MinHash LSH),
decontam (n-gram index of evaluation sets), tokenizer (train/load), shards (binary format),
layout (files of a dataset directory), prepare (the pipeline: stages clean -> tokenizer ->
encode -> manifest, through store and workers), dataset (read access), loader (packing,
mixtures, ranks, resume), sft (instruction data), commands (CLI functions).
Names are imported lazily so `import plinth.data.commands` stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["Dataset", "PackedLoader", "open_dataset", "prepare_dataset"]

_LAZY = {
    "prepare_dataset": "plinth.data.prepare",
    "open_dataset": "plinth.data.dataset",
    "Dataset": "plinth.data.dataset",
    "PackedLoader": "plinth.data.loader",
}

if TYPE_CHECKING:
    from plinth.data.dataset import Dataset, open_dataset
    from plinth.data.loader import PackedLoader
    from plinth.data.prepare import prepare_dataset


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plinth.data' has no attribute {name!r}")
