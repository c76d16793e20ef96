"""Tokenizer training shows progress, and unigram (minutes per few MB in `tokenizers`) trains
on a bounded sample unless data.tokenizer.train_max_bytes is chosen, saying so."""

from __future__ import annotations

from datahelpers import make_config, run_plinth, write_config, write_text_corpus

from plinth.data import open_dataset, prepare_dataset
from plinth.data import tokenizer as tkz
from plinth.data.prepare import config_fingerprint


def _tc(**tok):
    return make_config("unused", [{"kind": "stdlib_code"}], tokenizer=tok).data.tokenizer


def test_unigram_is_bounded_only_while_the_limit_is_the_default():
    budget, note = tkz.train_budget(_tc(kind="unigram"))
    assert budget == tkz.UNIGRAM_SAMPLE_BYTES
    assert "data.tokenizer.train_max_bytes" in note and "4 MB" in note
    assert tkz.train_budget(_tc(kind="unigram", train_max_bytes=12_345)) == (12_345, None)
    assert tkz.train_budget(_tc(kind="unigram", train_max_bytes=None)) == (None, None)
    assert tkz.train_budget(_tc(kind="bpe")) == (256_000_000, None)


def test_prepare_records_the_unigram_sample_limit(tmp_path, monkeypatch):
    write_text_corpus(tmp_path / "texts", 60, seed=9)
    src = [{"kind": "text", "path": str(tmp_path / "texts")}]
    cfg = make_config(tmp_path / "ds", src, vocab=200, tokenizer={"kind": "unigram"})
    full = config_fingerprint(cfg)
    monkeypatch.setattr(tkz, "UNIGRAM_SAMPLE_BYTES", 5_000)
    assert config_fingerprint(cfg) != full  # another limit is another dataset
    trained = open_dataset(prepare_dataset(cfg, progress=False)).manifest["tokenizer"]["trained_on"]
    assert trained["limit_bytes"] == 5_000
    assert 5_000 <= trained["bytes"] < 5_000 + 4_000  # cut after the document crossing it
    bpe = make_config(tmp_path / "ds2", src, vocab=300)
    info = open_dataset(prepare_dataset(bpe, progress=False)).manifest["tokenizer"]
    assert "limit_bytes" not in info["trained_on"]


def test_tokenizer_train_shows_progress_and_time(tmp_path):
    write_text_corpus(tmp_path / "texts", 30, seed=10)
    cfg = write_config(
        tmp_path / "cfg.yaml", tmp_path / "ds", [{"kind": "text", "path": str(tmp_path / "texts")}]
    )
    r = run_plinth(
        "data", "tokenizer", "train", cfg, "data.tokenizer.kind=unigram", "model.vocab_size=200",
        "--output", tmp_path / "tok.json",
    )
    assert r.returncode == 0, r.stderr
    assert "train unigram tokenizer" in r.stderr and "MB; vocab" in r.stderr
    assert "saved" in r.stdout and " in " in r.stdout and (tmp_path / "tok.json").is_file()
