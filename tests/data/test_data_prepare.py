"""prepare_dataset end to end: outputs, manifest, reuse, determinism, atomicity, tokenizers."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
from datahelpers import make_config, write_text_corpus

from plinth.data import open_dataset, prepare_dataset
from plinth.data.filters import normalize
from plinth.errors import PlinthError, UsageError


def test_outputs_and_manifest(tiny_ds, corpus_dir):
    ds, m = tiny_ds, tiny_ds.manifest
    files = sorted(p.name for p in ds.path.iterdir())
    assert files == ["manifest.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]
    assert len(ds.fingerprint) == 16 and ds.fingerprint == m["fingerprint"]
    texts, records = m["sources"]
    assert (texts["name"], texts["docs_read"], records["docs_read"]) == ("texts", 120, 60)
    assert len(texts["content_sha256"]) == 64
    assert texts["content_sha256"] != records["content_sha256"]
    assert m["filters"]["settings"]["min_chars"] == 32 and m["filters"]["checked"] == 180
    kept = texts["kept"] + records["kept"]
    assert kept == ds.num_docs("train") + ds.num_docs("val")
    assert kept == 180 - sum(m["filters"]["dropped"].values()) - m["dedup"]["exact"]["removed"] \
        - m["dedup"]["near"]["removed"]
    # per-source validation docs: round(n * 0.1), seeded
    val_src = m["splits"]["val"]["sources"]
    assert val_src["texts"]["docs"] == round(texts["kept"] * 0.1)
    assert val_src["records"]["docs"] == round(records["kept"] * 0.1)
    for split in ("train", "val"):
        d = m["splits"][split]
        shard_tokens = sum(s["tokens"] for s in d["shards"])
        assert shard_tokens == d["tokens"] == ds.num_tokens(split) > 0
        assert ds.bytes_per_token(split) == pytest.approx(d["bytes"] / d["tokens"])
        assert 1.5 < ds.bytes_per_token(split) < 8
        assert d["itemsize"] == 2
    tok = m["tokenizer"]
    assert len(tok["sha256"]) == 64 and tok["vocab_size"] == ds.vocab_size <= 512
    assert (ds.eos_id, ds.pad_id, ds.mask_id, ds.bos_id) == (0, 1, 2, 3)
    # a 512 vocab leaves (512 - 256 - 4) // 4 = 63 ids for sentinels
    assert ds.sentinel_ids == list(range(4, 67))
    assert ds.tokenizer.id_to_token(4) == "<|extra_0|>"
    assert m["config_fingerprint"] and m["seed"] == 7
    assert m["warnings"] == [
        "only 63 of data.tokenizer.sentinels=100 sentinel tokens fit a vocab of 512"
    ]


def test_documents_round_trip_through_shards(tiny_ds, corpus_dir):
    """Every kept document decodes back to its cleaned text (byte-level BPE is lossless)."""
    originals = {normalize(p.read_text()) for p in (corpus_dir / "texts").iterdir()}
    originals |= {normalize(json.loads(x)["text"])
                  for x in (corpus_dir / "records.jsonl").read_text().splitlines()}
    decoded = set()
    for split in ("train", "val"):
        for i in range(tiny_ds.num_docs(split)):
            decoded.add(tiny_ds.decode(tiny_ds.doc_tokens(split, i)))
    assert decoded <= originals and len(decoded) == tiny_ds.num_docs("train") + \
        tiny_ds.num_docs("val")
    train = {tiny_ds.decode(tiny_ds.doc_tokens("train", i)) for i in range(10)}
    val = {tiny_ds.decode(tiny_ds.doc_tokens("val", i)) for i in range(tiny_ds.num_docs("val"))}
    assert not train & val


def test_reuse_rebuild_and_determinism(tmp_path):
    write_text_corpus(tmp_path / "c", 40, seed=3)
    src = [{"kind": "text", "path": str(tmp_path / "c")}]
    cfg = make_config(tmp_path / "ds", src)
    prepare_dataset(cfg, progress=False)
    manifest = tmp_path / "ds" / "manifest.json"
    first = json.loads(manifest.read_text())
    mtime = manifest.stat().st_mtime_ns
    t = time.perf_counter()
    prepare_dataset(cfg, progress=False)  # same config: reused, nothing rewritten
    assert time.perf_counter() - t < 0.5 and manifest.stat().st_mtime_ns == mtime

    # the same data with two workers elsewhere: identical shards and fingerprint
    cfg2 = make_config(tmp_path / "ds2", src, workers=2)
    prepare_dataset(cfg2, progress=False)
    second = json.loads((tmp_path / "ds2" / "manifest.json").read_text())
    assert second["fingerprint"] == first["fingerprint"]
    assert second["config_fingerprint"] == first["config_fingerprint"]  # workers excluded

    # a changed input file is noticed and the dataset rebuilt
    p = tmp_path / "c" / "doc0000.txt"
    p.write_text(p.read_text() + "A brand new closing sentence about mountains.\n")
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    prepare_dataset(cfg, progress=False)
    third = json.loads(manifest.read_text())
    assert third["fingerprint"] != first["fingerprint"]
    assert third["sources"][0]["content_sha256"] != first["sources"][0]["content_sha256"]

    # a different seed changes the split (and so the fingerprint)
    cfg3 = make_config(tmp_path / "ds3", src, seed=8)
    prepare_dataset(cfg3, progress=False)
    assert json.loads((tmp_path / "ds3" / "manifest.json").read_text())["fingerprint"] != \
        third["fingerprint"]


def test_failed_rebuild_keeps_the_old_dataset(tmp_path):
    write_text_corpus(tmp_path / "c", 30, seed=4)
    src = [{"kind": "text", "path": str(tmp_path / "c")}]
    prepare_dataset(make_config(tmp_path / "ds", src), progress=False)
    before = open_dataset(tmp_path / "ds").fingerprint
    # every document too short for the filter: fails after reading, mid-build
    bad = make_config(tmp_path / "ds", src, filters__min_chars=10**6, filters__max_chars=10**7)
    with pytest.raises(UsageError, match=r"no document survived.*too_short: 30"):
        prepare_dataset(bad, progress=False)
    assert open_dataset(tmp_path / "ds", verify=True).fingerprint == before
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == ["c", "ds"]  # no temp dirs left


def _prepare_in_child(cfg_json: str) -> None:
    from plinth.config.schema import Config

    prepare_dataset(Config.model_validate_json(cfg_json), progress=False)


def test_concurrent_prepares_of_one_dir(tmp_path):
    """Like torchrun ranks that all call prepare_dataset: one builds, the others reuse it."""
    import multiprocessing as mp

    write_text_corpus(tmp_path / "c", 30, seed=9)
    cfg = make_config(tmp_path / "ds", [{"kind": "text", "path": str(tmp_path / "c")}])
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_prepare_in_child, args=(cfg.model_dump_json(),))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert ds.num_docs("train") + ds.num_docs("val") == 30
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    write_text_corpus(tmp_path / "c", 5)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    cfg = make_config(tmp_path / "mine", [{"kind": "text", "path": str(tmp_path / "c")}])
    with pytest.raises(UsageError, match="not a plinth dataset"):
        prepare_dataset(cfg, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_missing_dataset_and_corrupt_shard_are_reported(tmp_path, tiny_ds):
    with pytest.raises(UsageError, match="plinth data prepare"):
        open_dataset(tmp_path / "nothing")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_ds.path, copy)
    shard = copy / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(PlinthError, match="wrong size"):
        open_dataset(copy)


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_other_tokenizer_kinds(tmp_path, kind):
    write_text_corpus(tmp_path / "c", 40, seed=5)
    cfg = make_config(
        tmp_path / "ds", [{"kind": "text", "path": str(tmp_path / "c")}], vocab=400,
        tokenizer__kind=kind,
    )
    ds = open_dataset(prepare_dataset(cfg, progress=False))
    assert ds.manifest["tokenizer"]["kind"] == kind and ds.vocab_size <= 400
    assert (ds.eos_id, ds.bos_id) == (0, 3)
    assert ds.tokenizer.token_to_id("<|unk|>") == 4
    n_sent = (400 - 4 - 1) // 4
    assert ds.sentinel_ids == list(range(5, 5 + n_sent))
    text = ds.decode(ds.doc_tokens("train", 0))
    assert len(text.split()) > 5 and "<|unk|>" not in text


def test_load_existing_tokenizer(tmp_path, tiny_ds):
    write_text_corpus(tmp_path / "c", 20, seed=6)
    src = [{"kind": "text", "path": str(tmp_path / "c")}]
    tok_file = str(tiny_ds.path / "tokenizer.json")
    ds = open_dataset(prepare_dataset(
        make_config(tmp_path / "a", src, tokenizer__path=tok_file), progress=False
    ))
    assert ds.manifest["tokenizer"]["sha256"] == tiny_ds.manifest["tokenizer"]["sha256"]
    assert ds.manifest["tokenizer"]["added_special_tokens"] == []
    extra = ["<|endoftext|>", "<|pad|>", "<|mask|>", "<|bos|>", "<|sep|>"]
    ds2 = open_dataset(prepare_dataset(
        make_config(tmp_path / "b", src, tokenizer__path=tok_file,
                    tokenizer__special_tokens=extra), progress=False
    ))
    assert ds2.manifest["tokenizer"]["added_special_tokens"] == ["<|sep|>"]
    assert ds2.vocab_size == tiny_ds.vocab_size + 1
    assert any("<|sep|>" in w for w in ds2.manifest["warnings"])
    with pytest.raises(UsageError, match="cannot load the tokenizer"):
        prepare_dataset(make_config(tmp_path / "c2", src, tokenizer__path=str(tmp_path / "x.json")),
                        progress=False)


def test_vocab_too_small_and_tiny_vocab(tmp_path):
    write_text_corpus(tmp_path / "c", 20, seed=7)
    src = [{"kind": "text", "path": str(tmp_path / "c")}]
    with pytest.raises(UsageError, match=r"vocab size 200 \(model.vocab_size\).*at least 260"):
        prepare_dataset(make_config(tmp_path / "ds", src, vocab=200), progress=False)
    assert not (tmp_path / "ds").exists()
    ds = open_dataset(prepare_dataset(make_config(tmp_path / "ds", src, vocab=300), progress=False))
    assert len(ds.sentinel_ids) == (300 - 260) // 4
    assert any("sentinel" in w for w in ds.manifest["warnings"])


def test_empty_validation_split(tmp_path):
    write_text_corpus(tmp_path / "c", 20, seed=8)
    cfg = make_config(tmp_path / "ds", [{"kind": "text", "path": str(tmp_path / "c")}],
                      val_fraction=0.0)
    ds = open_dataset(prepare_dataset(cfg, progress=False))
    assert ds.num_docs("val") == 0 and math.isnan(ds.bytes_per_token("val"))
    from plinth.data import PackedLoader

    with pytest.raises(PlinthError, match=r"'val' split .* has no documents"):
        PackedLoader(ds, "val", seq_len=16, batch_size=2)


def test_stdlib_corpus_prepare_and_inspect(tmp_path, capsys):
    """The embedded default corpus through the CLI functions (capped so the test is quick)."""
    from plinth.data import commands

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: {vocab_size: 1024}\n"
        "data:\n"
        f"  dir: {tmp_path / 'std'}\n"
        "  max_bytes: 300000\n"
        "  sources: [{kind: stdlib_code}, {kind: stdlib_docs, weight: 2}]\n"
    )
    assert commands.prepare(str(cfg)) == 0
    ds = open_dataset(tmp_path / "std")
    m = ds.manifest
    assert [s["name"] for s in m["sources"]] == ["stdlib_code", "stdlib_docs"]
    for s in m["sources"]:
        assert s["capped_by"] == "max_bytes=300000" and s["bytes_read"] >= 300000
        assert s["kept"] > 5
    assert ds.num_tokens("train") > 50_000
    out = capsys.readouterr().out
    assert "splits" in out and "stdlib_docs" in out
    assert commands.inspect(str(tmp_path / "std"), samples=2, verify=True) == 0
    out = capsys.readouterr().out
    for needle in ("shards verified", "top drop reasons", "document length", "train doc",
                   "tokenizer: bpe, vocab 1,024", "stdlib_code"):
        assert needle in out, needle
    sample = ds.decode(ds.doc_tokens("train", 0))
    assert len(sample) > 20


def test_tokenizer_train_command(tmp_path, capsys, corpus_dir):
    from plinth.data import commands

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: {vocab_size: 600}\n"
        f"data:\n  sources: [{{kind: text, path: {corpus_dir / 'texts'}}}]\n"
    )
    out = tmp_path / "tok" / "tokenizer.json"
    assert commands.tokenizer_train(str(cfg), ["data.tokenizer.sentinels=8"], output=str(out)) == 0
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out))
    assert tok.get_vocab_size() <= 600 and tok.token_to_id("<|extra_7|>") == 11
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and "8 sentinels" in printed


@pytest.mark.slow
def test_full_stdlib_default_corpus(tmp_path):
    """The whole embedded corpus (both sources, no caps) with two workers."""
    from plinth.config.schema import Config

    cfg = Config.model_validate({"data": {
        "dir": str(tmp_path / "full"), "workers": 2,
        "sources": [{"kind": "stdlib_code"}, {"kind": "stdlib_docs"}],
    }})
    ds = open_dataset(prepare_dataset(cfg, progress=False))
    assert ds.num_tokens("train") > 2_000_000
    assert all(s["capped_by"] is None for s in ds.manifest["sources"])
    assert np.isfinite(ds.bytes_per_token("val"))
