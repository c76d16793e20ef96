"""PII scrub counts in the manifest: per source, counted over the documents that are kept."""

from __future__ import annotations

import json
import random

import pytest
from datahelpers import document, make_config

from plinth.data import open_dataset, prepare_dataset


def _doc(rng: random.Random, *pii: str) -> str:
    """A document that passes the default filters, with `pii` embedded in its first line."""
    return f"Write to {' and '.join(pii)} today.\n" + document(rng, 6, 12)


@pytest.mark.parametrize("workers", [1, 2])
def test_pii_counts_follow_kept_documents(tmp_path, capsys, workers):
    rng = random.Random(3)
    a = _doc(rng, "alice@example.org", "10.1.2.3")
    b = _doc(rng, "bob@example.com")
    c = _doc(rng, "carol@example.net", "dave@example.net")
    d = _doc(rng, "127.0.0.1")  # loopback: not personal, not scrubbed
    texts = tmp_path / "texts"
    texts.mkdir()
    # files are read in name order; the copies of a and b come after them and are dropped
    for name, text in [("0a", a), ("1b", b), ("2c", c), ("3a_copy", a),
                       ("4b_upper", b.upper()), ("5d", d)]:
        (texts / f"{name}.txt").write_text(text, encoding="utf-8")
    records = tmp_path / "records.jsonl"
    rows = [_doc(rng, f"user{i}@example.org") for i in range(10)]
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))

    out = tmp_path / "ds"
    cfg = make_config(
        out,
        [{"kind": "text", "path": str(texts), "name": "texts"},
         {"kind": "jsonl", "path": str(records), "name": "records"}],
        max_docs=6,  # the records source stops after 6 of its 10 (one worker batch)
        workers=workers,
    )
    prepare_dataset(cfg, progress=False)
    m = open_dataset(out).manifest
    src_texts, src_records = m["sources"]
    assert (src_texts["kept"], src_texts["exact_duplicates"], src_texts["filtered"]) == (4, 2, {})
    assert src_texts["pii_scrubbed"] == {"email": 4, "ip": 1}
    assert (src_records["kept"], src_records["capped_by"]) == (6, "max_docs=6")
    assert src_records["pii_scrubbed"] == {"email": 6}

    from plinth.data import commands

    capsys.readouterr()
    assert commands.inspect(str(out), samples=0) == 0
    assert "PII scrubbed: {'email': 10, 'ip': 1}" in capsys.readouterr().out
