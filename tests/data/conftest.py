"""Fixtures for the data-pipeline tests: tiny corpora and one prepared dataset per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from datahelpers import make_config, write_jsonl, write_text_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_text_corpus(root / "texts", 120, seed=0)
    write_jsonl(root / "records.jsonl", 60, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_ds(corpus_dir, tmp_path_factory):
    """A prepared two-source dataset (text dir weight 3, jsonl weight 1), built once."""
    from plinth.data import open_dataset, prepare_dataset

    out = tmp_path_factory.mktemp("ds") / "tiny"
    cfg = make_config(
        out,
        [
            {"kind": "text", "path": str(corpus_dir / "texts"), "weight": 3.0, "name": "texts"},
            {"kind": "jsonl", "path": str(corpus_dir / "records.jsonl"), "weight": 1.0,
             "name": "records"},
        ],
    )
    prepare_dataset(cfg, progress=False)
    return open_dataset(out)
