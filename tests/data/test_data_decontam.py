"""`data.decontaminate`: prepare drops exactly the documents that share an evaluation n-gram."""

from __future__ import annotations

import json

import pytest
from datahelpers import make_config, write_text_corpus

from plinth.errors import UsageError

_WORDS = (
    "zanzibar quartz vortex lantern meadow copper falcon harbor violet canyon ember "
    "willow saffron glacier orbit"
)
EXAMPLE = _WORDS.split()  # 15 words, none of them in the synthetic corpus
PLANTED = {
    2: "Zanzibar, QUARTZ vortex -- lantern meadow copper falcon harbor violet canyon "
    "ember willow saffron!",
    7: " ".join(EXAMPLE[2:15]),
}
NEAR_MISS = {11: " ".join(EXAMPLE[3:15])}  # 12 words: one short of a 13-gram


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("decontam")
    texts = write_text_corpus(root / "texts", 30, seed=3)
    for i, line in {**PLANTED, **NEAR_MISS}.items():
        (root / "texts" / f"doc{i:04d}.txt").write_text(texts[i] + line + "\n", encoding="utf-8")
    evals = root / "evals.jsonl"
    rows = [
        {"question": " ".join(EXAMPLE[:8]) + "?", "answer": " ".join(EXAMPLE[8:])},
        {
            "question": "an unrelated question that nobody ever wrote",
            "answer": "into the training corpus at all today",
        },
    ]
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root, evals


def _cfg(root, out, **data):
    src = [{"kind": "text", "path": str(root / "texts"), "name": "texts"}]
    return make_config(out, src, **data)


def _texts(path) -> str:
    from plinth.data import open_dataset

    ds = open_dataset(path)
    return "\n".join(
        ds.decode(ds.doc_tokens(split, i))
        for split in ("train", "val")
        for i in range(ds.num_docs(split))
    )


def test_prepare_drops_exactly_the_planted_documents(setup):
    from plinth.data import prepare_dataset

    root, evals = setup
    base = prepare_dataset(_cfg(root, root / "base"), progress=False)
    clean = prepare_dataset(_cfg(root, root / "clean", decontaminate=[str(evals)]), progress=False)
    mb = json.loads((base / "manifest.json").read_text())
    mc = json.loads((clean / "manifest.json").read_text())
    src_b, src_c = mb["sources"][0], mc["sources"][0]
    assert src_c["filtered"]["contaminated"] == 2 and "contaminated" not in src_b["filtered"]
    assert src_b["kept"] - src_c["kept"] == 2
    refs = src_c["examples"]["contaminated"]
    assert sorted(r.split(":")[0].rsplit("/", 1)[-1] for r in refs) == [
        "doc0002.txt",
        "doc0007.txt",
    ]
    assert "evals example 0" in refs[0]
    assert mc["filters"]["dropped"]["contaminated"] == 2
    assert mc["decontamination"] == {
        "eval_sets": {"evals": 2},
        "ngram": 13,
        "ngrams": 5,
        "too_short": 0,
        "removed": 2,
    }
    assert "decontamination" not in mb
    text = _texts(clean).lower()
    assert "vortex lantern meadow" not in text  # the planted documents are gone ...
    assert NEAR_MISS[11] in text  # ... the near miss stays
    assert "vortex lantern meadow" in _texts(base).lower()


def test_forked_workers_give_the_same_dataset(setup):
    from plinth.data import prepare_dataset

    root, evals = setup
    one = prepare_dataset(_cfg(root, root / "w1", decontaminate=[str(evals)]), progress=False)
    two = prepare_dataset(
        _cfg(root, root / "w2", decontaminate=[str(evals)], workers=2), progress=False
    )
    m1 = json.loads((one / "manifest.json").read_text())
    m2 = json.loads((two / "manifest.json").read_text())
    assert m1["fingerprint"] == m2["fingerprint"]
    assert m2["sources"][0]["filtered"]["contaminated"] == 2


def test_fingerprint_follows_the_eval_files_and_bad_sets_fail(setup, tmp_path):
    from plinth.data import prepare_dataset
    from plinth.data.prepare import config_fingerprint

    root, evals = setup
    own = tmp_path / "evals.jsonl"
    own.write_text(evals.read_text())
    cfg = _cfg(root, tmp_path / "ds", decontaminate=[str(own)])
    before = config_fingerprint(cfg)
    assert before != config_fingerprint(_cfg(root, tmp_path / "ds"))
    assert before != config_fingerprint(
        _cfg(root, tmp_path / "ds", decontaminate=[str(own)], decontaminate_ngram=8)
    )
    own.write_text(own.read_text() + json.dumps({"q": "one more example"}) + "\n")
    assert config_fingerprint(cfg) != before
    missing = _cfg(root, tmp_path / "ds2", decontaminate=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(UsageError, match=r"nope\.jsonl does not exist"):
        prepare_dataset(missing, progress=False)
