"""Hostile data-prepare input found while hunting tracebacks: each is a counted skip in the
manifest or a clear exit-2 error naming the key and the fix, never a traceback."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from datahelpers import document, make_config, run_plinth, write_config, write_text_corpus

from plinth.data import open_dataset, prepare_dataset
from plinth.data.sources import check_source_config
from plinth.errors import UsageError


def _good_lines(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [json.dumps({"text": document(rng)}).encode() for _ in range(n)]


def test_deep_json_surrogates_big_numbers_and_broken_gzip_are_counted(tmp_path):
    jl = tmp_path / "r.jsonl"
    lines = _good_lines(4, 1)
    lines.append(b"[" * 200_000 + b"]" * 200_000)  # RecursionError in json
    lines.append(b'{"text": "lone \\ud800 surrogate and more words to pass the filters"}')
    lines.append(b'{"text": ' + b"9" * 5000 + b"}")  # over Python's int digit limit
    jl.write_bytes(b"\n".join(lines) + b"\n")
    texts = tmp_path / "t"
    write_text_corpus(texts, 3, seed=2)
    good = gzip.compress(document(random.Random(3)).encode() * 3)
    (texts / "bad.txt.gz").write_bytes(good[:30] + bytes(200) + good[230:])  # corrupt deflate
    cfg = make_config(
        tmp_path / "ds",
        [{"kind": "jsonl", "path": str(jl), "name": "r"}, {"kind": "text", "path": str(texts),
                                                             "name": "t"}],
    )
    m = open_dataset(prepare_dataset(cfg, progress=False)).manifest
    by = {s["name"]: s for s in m["sources"]}
    assert by["r"]["bad_input"] == {"invalid_json": 2, "not_utf8": 1}
    assert by["r"]["docs_read"] == 4
    assert any("nested too deeply" in e for e in by["r"]["examples"]["invalid_json"])
    assert "lone surrogate" in by["r"]["examples"]["not_utf8"][0]
    assert by["t"]["bad_input"] == {"unreadable": 1} and by["t"]["docs_read"] == 3


def test_parquet_corrupt_past_its_footer_is_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(4)
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [document(rng) for _ in range(3000)]}), p,
                   row_group_size=500)
    b = bytearray(p.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 2000):
        b[i] = rng.randrange(256)
    p.write_bytes(bytes(b))
    cfg = make_config(tmp_path / "ds", [{"kind": "parquet", "path": str(p)}])
    m = open_dataset(prepare_dataset(cfg, progress=False)).manifest
    src = m["sources"][0]
    assert src["bad_input"].get("unreadable") == 1
    assert 0 < src["docs_read"] < 3000
    assert "read failed" in src["examples"]["unreadable"][0]


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"kind": "text", "path": "corpus/a\x00b"}, "data.sources[0].path contains a NUL"),
        ({"kind": "text", "path": "corpus/", "pattern": "/"}, "data.sources[0].pattern='/'"),
    ],
)
def test_impossible_paths_are_config_errors(source, needle):
    from plinth.config.sections.data import SourceConfig

    with pytest.raises(UsageError) as e:
        check_source_config(SourceConfig(**source), "data.sources[0]")
    assert needle in str(e.value)


def test_a_nul_in_a_path_exits_2_from_the_cli(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "ds", [{"kind": "text", "path": "a\x00b"}])
    r = run_plinth("data", "prepare", cfg)
    assert r.returncode == 2 and "NUL character" in r.stderr and "Traceback" not in r.stderr


def test_bad_globs_are_counted_not_fatal(tmp_path):
    write_text_corpus(tmp_path / "t", 4, seed=5)
    cfg = make_config(
        tmp_path / "ds",
        [
            {"kind": "text", "path": str(tmp_path / "t"), "name": "ok"},
            {"kind": "text", "path": str(tmp_path / "t" / "[unclosed*.txt"), "name": "bad"},
            {"kind": "text", "path": str(tmp_path / "nowhere" / "**" / "*.txt"), "name": "none"},
        ],
    )
    m = open_dataset(prepare_dataset(cfg, progress=False)).manifest
    by = {s["name"]: s for s in m["sources"]}
    assert by["bad"]["bad_input"] == {"missing_path": 1}
    assert by["none"]["bad_input"] == {"missing_path": 1}
    assert by["ok"]["docs_read"] == 4


def test_sft_and_decontamination_json_that_python_cannot_read(tmp_path):
    from plinth.data.decontam import load_eval_file
    from plinth.data.sft import read_jsonl

    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(b"[" * 200_000 + b"]" * 200_000 + b"\n")
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"prompt": ' + b"9" * 5000 + b', "completion": "x"}\n')
    with pytest.raises(UsageError, match="line 1 is nested too deeply"):
        read_jsonl(deep)
    with pytest.raises(UsageError, match="line 1 is not valid JSON"):
        read_jsonl(big)
    with pytest.raises(UsageError, match=r"deep\.jsonl:1 is not valid JSON"):
        load_eval_file(deep)
