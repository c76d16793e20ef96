"""The on-disk layout of a prepared dataset directory, shared by its writer and its reader.

    data/quickstart/
      manifest.json          counts, hashes, settings, fingerprints (MANIFEST)
      tokenizer.json         the tokenizer the shards were encoded with (TOKENIZER)
      train_000000.bin ...   token shards per split (see plinth.data.shards), `shard_file`

`plinth.data.prepare` writes this layout and `plinth.data.dataset` reads it; a change to it
bumps FORMAT_VERSION, which also changes every config fingerprint (datasets are rebuilt).
"""

from __future__ import annotations

FORMAT = "plinth-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")


def shard_file(split: str, index: int) -> str:
    """File name of a split's `index`-th shard."""
    return f"{split}_{index:06d}.bin"
