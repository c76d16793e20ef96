"""Exact and MinHash-LSH near-duplicate detection on planted duplicates."""

from __future__ import annotations

import random

import numpy as np
from datahelpers import document

from plinth.data import dedup as D


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [document(rng, 8, 20) for _ in range(n)]


def near_copy(text: str, rng: random.Random, edits: int = 2) -> str:
    words = text.split(" ")
    for _ in range(edits):
        words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


def test_exact_key_ignores_case_and_whitespace():
    assert D.exact_key("Hello   World\n") == D.exact_key("hello world")
    assert D.exact_key("hello world") != D.exact_key("hello worlds")


def test_lsh_params_fit_threshold():
    b, r = D.lsh_params(0.8, 128)
    assert b * r <= 128
    s_curve = lambda s: 1 - (1 - s**r) ** b  # noqa: E731
    assert s_curve(0.95) > 0.99 and s_curve(0.5) < 0.1
    assert (1 / b) ** (1 / r) == __import__("pytest").approx(0.8, abs=0.1)


def test_signature_similarity_tracks_jaccard():
    base = corpus(1)[0]
    rng = random.Random(1)
    sigs = D.minhash_signatures([base, near_copy(base, rng, 1), corpus(1, seed=9)[0]], 256, 3)
    same = np.mean(sigs[0] == sigs[1])
    other = np.mean(sigs[0] == sigs[2])
    assert same > 0.7 and other < 0.2
    again = D.minhash_signatures([base], 256, 3)
    assert np.array_equal(again[0], sigs[0])  # deterministic across calls


def test_near_dedup_finds_planted_and_keeps_distinct():
    rng = random.Random(3)
    originals = corpus(300, seed=5)
    planted = {}  # index of the copy -> index of its original
    docs = list(originals)
    for i in rng.sample(range(300), 40):
        planted[len(docs)] = i
        docs.append(near_copy(originals[i], rng, edits=1))
    order = list(range(len(docs)))
    sigs = D.minhash_signatures(docs, 128, 5)
    dd = D.NearDedup(threshold=0.7, num_perm=128)
    dup_of = dd.add_many(sigs[order])
    found = {i for i, d in enumerate(dup_of) if d is not None}
    assert found == set(planted), (sorted(found - set(planted)), sorted(set(planted) - found))
    # the representative is the original (added first), one per cluster
    assert all(dup_of[i] == planted[i] for i in planted)
    st = dd.stats()
    assert st["clusters_with_duplicates"] == len(set(planted.values()))
    assert dd.num_representatives == 300


def test_short_documents_get_a_shingle():
    _flat, offs = D.shingle_hashes(["one two", "a b c d e f g", ""], 5)
    assert np.diff(offs.astype(np.int64)).tolist() == [1, 3, 1]
    sigs = D.minhash_signatures(["one two", "one two", "three four"], 64, 5)
    assert np.array_equal(sigs[0], sigs[1]) and not np.array_equal(sigs[0], sigs[2])
