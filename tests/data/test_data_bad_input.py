"""Bad input is skipped, counted in the manifest under its reason and reported; never fatal."""

from __future__ import annotations

import json

import pytest
from datahelpers import document, make_config, write_text_corpus

from plinth.data import open_dataset, prepare_dataset
from plinth.errors import UsageError

BIG = 100 * 2**20  # a single 100 MB line


def test_every_bad_input_case_in_one_job(tmp_path):
    import random

    rng = random.Random(0)
    texts = tmp_path / "texts"
    write_text_corpus(texts, 6, seed=1)
    (texts / "empty.txt").write_bytes(b"")
    (texts / "blank.txt").write_bytes(b"  \n\t\n")
    (texts / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (texts / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e, ".encode("latin-1") * 20)
    (texts / "ignored.csv").write_text("a,b\n1,2\n")  # not matched by the default patterns

    jl = tmp_path / "records.jsonl"
    good = [document(rng) for _ in range(5)]
    with open(jl, "wb") as f:
        for t in good[:2]:
            f.write(json.dumps({"text": t}).encode() + b"\n")
        f.write(b'{"text": "unterminated\n')  # invalid JSON
        f.write(b'{"body": "no text field here"}\n')  # missing field
        f.write(b'{"text": 42}\n')  # not a string
        f.write(b'["a", "list"]\n')  # not an object
        f.write(b"\n")  # blank line
        f.write(b'{"text": "caf\xe9"}\n')  # not UTF-8
        f.write(b'{"text": "')  # the 100 MB line, written in pieces
        chunk = b"a" * 2**20
        for _ in range(BIG // len(chunk)):
            f.write(chunk)
        f.write(b'"}\n')
        for t in good[2:]:
            f.write(json.dumps({"text": t}).encode() + b"\n")
    (tmp_path / "nothing_here").mkdir()
    (tmp_path / "nothing_here" / "data.bin").write_bytes(b"\x00\x01")

    cfg = make_config(
        tmp_path / "ds",
        [
            {"kind": "text", "path": str(texts), "name": "texts"},
            {"kind": "jsonl", "path": str(jl), "name": "records"},
            {"kind": "text", "path": str(tmp_path / "nothing_here"), "name": "emptydir"},
            {"kind": "jsonl", "path": str(tmp_path / "missing.jsonl"), "name": "missing"},
        ],
    )
    ds = open_dataset(prepare_dataset(cfg, progress=False))
    m = ds.manifest
    by = {s["name"]: s for s in m["sources"]}
    assert by["texts"]["bad_input"] == {
        "empty_file": 2, "binary": 1, "not_utf8": 1
    }
    assert by["texts"]["docs_read"] == 6
    assert by["records"]["bad_input"] == {
        "invalid_json": 1, "missing_field": 2, "field_not_text": 1, "blank_line": 1,
        "not_utf8": 1, "too_large": 1,
    }
    assert by["records"]["docs_read"] == 5
    assert by["emptydir"]["bad_input"] == {"no_files": 1}
    assert by["missing"]["bad_input"] == {"missing_path": 1}
    assert m["bad_input"]["not_utf8"] == 2
    # reported with where it was and what to do
    ex = by["records"]["examples"]
    assert ex["invalid_json"][0].startswith(f"{jl}:3: not JSON")
    assert ex["too_large"][0].startswith(f"{jl}:9: line of {BIG + 13:,} bytes")
    assert "data.max_doc_bytes" in ex["too_large"][0]
    assert "pattern" in by["emptydir"]["examples"]["no_files"][0]
    warnings = "\n".join(m["warnings"])
    for needle in ("texts: 1 input(s) skipped as binary", "records: 1 input(s) skipped as "
                   "too_large", "emptydir: 1 input(s) skipped as no_files", "missing_path"):
        assert needle in warnings
    # the good documents all made it (11 read, none filtered or duplicated)
    assert ds.num_docs("train") + ds.num_docs("val") == 11


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"")
    (tmp_path / "d" / "b.txt").write_bytes(b"\xff\xfe\x00bin")
    cfg = make_config(tmp_path / "ds", [{"kind": "text", "path": str(tmp_path / "d")}])
    with pytest.raises(UsageError) as e:
        prepare_dataset(cfg, progress=False)
    msg = str(e.value)
    assert "no document survived" in msg and "empty_file: 1" in msg and "binary: 1" in msg
    assert not (tmp_path / "ds").exists()


def test_source_without_path_is_a_config_error(tmp_path):
    cfg = make_config(tmp_path / "ds", [{"kind": "jsonl"}])
    with pytest.raises(UsageError, match=r"data.sources\[0\].path is required for kind=jsonl"):
        prepare_dataset(cfg, progress=False)


def test_jsonl_text_field_and_gzip(tmp_path):
    import gzip
    import random

    rng = random.Random(2)
    docs = [document(rng) for _ in range(8)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for t in docs:
            f.write(json.dumps({"content": t}) + "\n")
    cfg = make_config(tmp_path / "ds", [
        {"kind": "jsonl", "path": str(tmp_path), "text_field": "content"}
    ])
    ds = open_dataset(prepare_dataset(cfg, progress=False))
    assert ds.manifest["sources"][0]["docs_read"] == 8
    assert ds.manifest["sources"][0]["bad_input"] == {}


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import random

    rng = random.Random(3)
    docs = [document(rng) for _ in range(12)]
    pq.write_table(pa.table({"text": [*docs, None], "n": list(range(13))}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    cfg = make_config(tmp_path / "ds", [{"kind": "parquet", "path": str(tmp_path)}])
    m = open_dataset(prepare_dataset(cfg, progress=False)).manifest
    s = m["sources"][0]
    assert s["docs_read"] == 12
    assert s["bad_input"] == {"missing_field": 2, "unreadable": 1}
    assert "columns: ['body']" in s["examples"]["missing_field"][1]


def test_hf_disk_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    import random

    rng = random.Random(4)
    docs = [document(rng) for _ in range(10)]
    d = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": docs[:7]}),
        "test": datasets.Dataset.from_dict({"text": docs[7:]}),
    })
    d.save_to_disk(str(tmp_path / "hf"))
    cfg = make_config(tmp_path / "ds", [{"kind": "hf_disk", "path": str(tmp_path / "hf")}])
    m = open_dataset(prepare_dataset(cfg, progress=False)).manifest
    assert m["sources"][0]["docs_read"] == 10
    cfg = make_config(tmp_path / "ds2", [
        {"kind": "hf_disk", "path": str(tmp_path / "hf"), "text_field": "content"},
        {"kind": "hf_disk", "path": str(tmp_path / "nope")},
        {"kind": "text", "path": str(tmp_path / "t")},
    ])
    write_text_corpus(tmp_path / "t", 5)
    m = open_dataset(prepare_dataset(cfg, progress=False)).manifest
    assert m["sources"][0]["bad_input"] == {"missing_field": 2}
    assert m["sources"][1]["bad_input"] == {"missing_path": 1}
