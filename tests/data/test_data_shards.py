"""The binary shard format: round trip, dtype choice, header, corruption detection."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from plinth.data.shards import HEADER_SIZE, MAGIC, Shard, ShardWriter, itemsize_for
from plinth.errors import PlinthError


def write(path, docs, vocab, sources=None):
    w = ShardWriter(path, vocab)
    lengths = np.array([len(d) for d in docs])
    flat = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    # add in two calls to exercise appending
    half = len(docs) // 2
    cut = int(lengths[:half].sum())
    src = np.asarray(sources if sources is not None else [0] * len(docs))
    w.add(flat[:cut], lengths[:half], src[:half])
    w.add(flat[cut:], lengths[half:], src[half:])
    return w.close()


@pytest.mark.parametrize("vocab", [512, 65536, 70000])
def test_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 1, 300, 17, 0, 42)]
    rec = write(tmp_path / "s.bin", docs, vocab, sources=[0, 1, 2, 1, 0, 3])
    s = Shard(tmp_path / "s.bin")
    assert s.itemsize == itemsize_for(vocab) == (2 if vocab <= 65536 else 4)
    assert s.tokens.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert isinstance(s.tokens, np.memmap)
    assert (s.n_docs, s.n_tokens, s.vocab_size) == (6, sum(map(len, docs)), vocab)
    for i, d in enumerate(docs):
        assert np.array_equal(s.doc(i), d)
    assert s.sources.tolist() == [0, 1, 2, 1, 0, 3]
    assert s.lengths().tolist() == [len(d) for d in docs]
    assert rec["docs"] == 6 and rec["tokens"] == s.n_tokens
    assert rec["bytes"] == (tmp_path / "s.bin").stat().st_size
    assert not list(tmp_path.glob("*.tmp"))
    head = (tmp_path / "s.bin").read_bytes()[:HEADER_SIZE]
    assert head[:8] == MAGIC and struct.unpack("<I", head[8:12])[0] == 1


def test_token_out_of_vocab_is_refused(tmp_path):
    w = ShardWriter(tmp_path / "s.bin", 100)
    with pytest.raises(PlinthError, match="does not fit the vocab"):
        w.add(np.array([1, 200]), np.array([2]), np.array([0]))
    w.abort()
    assert not list(tmp_path.iterdir())


def test_unfinished_shard_is_not_visible(tmp_path):
    w = ShardWriter(tmp_path / "s.bin", 100)
    w.add(np.array([1, 2, 3]), np.array([3]), np.array([0]))
    assert not (tmp_path / "s.bin").exists()  # only the .tmp until close()
    w.close()
    assert Shard(tmp_path / "s.bin").doc(0).tolist() == [1, 2, 3]


def test_corrupt_shards_are_reported(tmp_path):
    write(tmp_path / "s.bin", [np.arange(10)], 100)
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[:-3])
    with pytest.raises(PlinthError, match="truncated or corrupt"):
        Shard(tmp_path / "trunc.bin")
    (tmp_path / "magic.bin").write_bytes(b"XXXXXXXX" + data[8:])
    with pytest.raises(PlinthError, match="not a plinth token shard"):
        Shard(tmp_path / "magic.bin")
    (tmp_path / "ver.bin").write_bytes(data[:8] + struct.pack("<I", 99) + data[12:])
    with pytest.raises(PlinthError, match="version 99"):
        Shard(tmp_path / "ver.bin")
