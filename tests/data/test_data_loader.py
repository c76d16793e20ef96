"""PackedLoader: shapes, determinism, exact resume, ranks, mixtures, packing, curriculum."""

from __future__ import annotations

import json
from itertools import islice, pairwise

import numpy as np
import pytest
import torch

from plinth.data import PackedLoader
from plinth.errors import UsageError


def take(loader, n):
    return [b.clone() for b in islice(iter(loader), n)]


def test_shape_dtype_and_determinism(tiny_ds):
    a = take(PackedLoader(tiny_ds, "train", seq_len=32, batch_size=4, seed=1), 5)
    b = take(PackedLoader(tiny_ds, "train", seq_len=32, batch_size=4, seed=1), 5)
    c = take(PackedLoader(tiny_ds, "train", seq_len=32, batch_size=4, seed=2), 5)
    assert a[0].shape == (4, 33) and a[0].dtype == torch.long
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert int(torch.stack(a).max()) < tiny_ds.vocab_size


@pytest.mark.parametrize("packing", ["concat", "bos_aligned"])
def test_exact_resume_across_epochs(tiny_ds, packing):
    kw = dict(split="train", seq_len=64, batch_size=16, seed=3, packing=packing)
    ref = PackedLoader(tiny_ds, **kw)
    per_epoch = len(ref)
    n = per_epoch + 10  # run past the end of the first epoch of every source
    it = iter(ref)
    stop = per_epoch - 3
    head = [next(it).clone() for _ in range(stop)]
    sd = json.loads(json.dumps(ref.state_dict()))  # survives JSON
    tail = [next(it).clone() for _ in range(n - stop)]
    assert ref.epoch > 1.0
    resumed = PackedLoader(tiny_ds, **kw)
    resumed.load_state_dict(sd)
    again = take(resumed, n - stop)
    assert all(torch.equal(x, y) for x, y in zip(tail, again, strict=True))
    assert len(head) == stop
    assert sd["global_row"] == stop * 16 and all(isinstance(v, int) for p in sd["source_pos"]
                                                 for v in p)


def test_ranks_are_disjoint_slices_of_one_stream(tiny_ds):
    W, B = 3, 4
    single = take(PackedLoader(tiny_ds, seq_len=32, batch_size=W * B, seed=5), 6)
    ranks = [take(PackedLoader(tiny_ds, seq_len=32, batch_size=B, seed=5, rank=r,
                               world_size=W), 6) for r in range(W)]
    for k in range(6):
        assert torch.equal(torch.cat([ranks[r][k] for r in range(W)]), single[k])
    rows = {tuple(row.tolist()) for r in range(W) for b in ranks[r] for row in b}
    assert len(rows) == W * B * 6  # no row is seen by two ranks


def test_resume_with_a_different_world_size(tiny_ds):
    one = PackedLoader(tiny_ds, seq_len=32, batch_size=4, seed=6)
    it = iter(one)
    for _ in range(3):
        next(it)
    sd = one.state_dict()
    expected = next(it)
    halves = []
    for r in range(2):
        lo = PackedLoader(tiny_ds, seq_len=32, batch_size=2, seed=6, rank=r, world_size=2)
        lo.load_state_dict(sd)
        halves.append(next(iter(lo)))
    assert torch.equal(torch.cat(halves), expected)


def test_state_mismatch_is_refused(tiny_ds):
    sd = PackedLoader(tiny_ds, seq_len=32, batch_size=4, seed=6).state_dict()
    with pytest.raises(UsageError, match="seq_len: saved 32, now 16"):
        PackedLoader(tiny_ds, seq_len=16, batch_size=4, seed=6).load_state_dict(sd)
    with pytest.raises(UsageError, match="seed"):
        PackedLoader(tiny_ds, seq_len=32, batch_size=4, seed=7).load_state_dict(sd)


def test_mixture_ratios(tiny_ds):
    # manifest weights: texts 3, records 1; the records source is half the size of texts
    lo = PackedLoader(tiny_ds, seq_len=16, batch_size=64, seed=8)
    counts = np.zeros(2)
    for _ in islice(iter(lo), 60):
        counts += np.bincount(lo.batch_sources, minlength=2)
    assert counts[0] / counts.sum() == pytest.approx(0.75, abs=0.02)
    lo = PackedLoader(tiny_ds, seq_len=16, batch_size=64, seed=8,
                      weights={"texts": 1, "records": 4})
    counts = np.zeros(2)
    for _ in islice(iter(lo), 60):
        counts += np.bincount(lo.batch_sources, minlength=2)
    assert counts[1] / counts.sum() == pytest.approx(0.8, abs=0.02)
    only = PackedLoader(tiny_ds, seq_len=16, batch_size=8, seed=8, weights=[0, 1])
    next(iter(only))
    assert set(only.batch_sources.tolist()) == {1}


def _stream(ds, source, eos):
    t = ds.doc_table("train")
    docs = np.flatnonzero(t.source == source)
    return np.concatenate([np.append(ds.doc_tokens("train", int(d)), eos) for d in docs])


def test_concat_rows_are_the_document_stream(tiny_ds):
    R = 33
    lo = PackedLoader(tiny_ds, seq_len=R - 1, batch_size=5, seed=0, shuffle=False, loop=False)
    rows, srcs = [], []
    for b in lo:
        rows.append(b.numpy())
        srcs.append(lo.batch_sources)
    rows, srcs = np.concatenate(rows), np.concatenate(srcs)
    for s in (0, 1):
        stream = _stream(tiny_ds, s, tiny_ds.eos_id)
        n = len(stream) // R
        assert (srcs == s).sum() == n
        assert np.array_equal(rows[srcs == s].ravel(), stream[: n * R])
    # the sources are interleaved evenly: the first quarter of the pass has both in proportion
    q = len(srcs) // 4
    assert abs((srcs[:q] == 1).mean() - (srcs == 1).mean()) < 0.05
    # a second pass gives the same batches; len() is the number of batches
    assert len(list(lo)) == len(lo) == -(-len(rows) // 5)


def test_finite_pass_split_evenly_across_ranks(tiny_ds):
    full = torch.cat(list(PackedLoader(tiny_ds, "val", seq_len=16, batch_size=4, seed=0,
                                       shuffle=False, loop=False)))
    parts = [list(PackedLoader(tiny_ds, "val", seq_len=16, batch_size=4, seed=0, shuffle=False,
                               loop=False, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    got = {tuple(r.tolist()) for p in parts for b in p for r in b}
    assert got <= {tuple(r.tolist()) for r in full}
    assert len(got) == len(full) // 2 * 2


def test_bos_aligned_rows_start_documents(tiny_ds):
    R = 65
    C = R - 1
    lo = PackedLoader(tiny_ds, seq_len=R - 1, batch_size=8, seed=0, packing="bos_aligned",
                      loop=False)
    bos, eos = tiny_ds.bos_id, tiny_ds.eos_id
    pieces = {}
    for d in range(tiny_ds.num_docs("train")):
        full = np.append(tiny_ds.doc_tokens("train", d), eos)
        for a in range(0, len(full), C):
            pieces[tuple(full[a : a + 6])] = full[a : a + C]
    rows = torch.cat(list(lo)).numpy()
    used = 0
    for row in rows:
        assert row[0] == bos
        starts = [*np.flatnonzero(row == bos).tolist(), R]
        for s, e in pairwise(starts):
            seg = row[s + 1 : e]
            used += len(seg)
            if len(seg) >= 6:  # every segment is the start of a document (or of a piece)
                piece = pieces[tuple(seg[:6])]
                assert np.array_equal(seg, piece[: len(seg)])
    total = tiny_ds.num_tokens("train") + tiny_ds.num_docs("train")  # tokens + EOS
    assert used / total > 0.9  # best-fit packing wastes little


def test_short_first_curriculum(tiny_ds):
    lo = PackedLoader(tiny_ds, seq_len=64, batch_size=8, seed=0, curriculum="short_first",
                      weights=[1, 0])
    batches = take(lo, len(lo))
    eos_first = sum(int((b == tiny_ds.eos_id).sum()) for b in batches[:3])
    eos_last = sum(int((b == tiny_ds.eos_id).sum()) for b in batches[-3:])
    assert eos_first > 2 * eos_last  # short documents (many separators) come first
    plain = take(PackedLoader(tiny_ds, seq_len=64, batch_size=8, seed=0, weights=[1, 0]), 3)
    assert sum(int((b == tiny_ds.eos_id).sum()) for b in plain) < eos_first


def test_epoch_counter(tiny_ds):
    lo = PackedLoader(tiny_ds, seq_len=64, batch_size=8, seed=0)
    n = len(lo)
    take(lo, n)
    assert lo.epoch == pytest.approx(1.0, abs=8 / (n * 8))


def test_too_little_data_for_a_row(tiny_ds):
    from plinth.errors import PlinthError

    with pytest.raises(PlinthError, match="not enough for one row"):
        PackedLoader(tiny_ds, "val", seq_len=100_000, batch_size=1)
