"""A tiny prepared corpus shared by the end-to-end recipe tests (prepared once per session)."""

from __future__ import annotations

import pytest

from plinth.config.load import load_config

TINY = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.vocab_size=512",
    "model.max_seq_len=32",
    "data.max_docs=120",
    "optim.micro_batch=4",
    "optim.global_batch=8",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
    "tracking.log_every=1",
    "tracking.eval_every=10",
    "tracking.eval_batches=4",
    "tracking.checkpoint_every=10",
    "tracking.sample_every=10",
]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    from plinth.data import prepare_dataset

    d = tmp_path_factory.mktemp("data") / "tiny"
    cfg = load_config([], [*TINY, f"data.dir={d}"]).config
    prepare_dataset(cfg, progress=False)
    return d


@pytest.fixture
def tiny_overrides(tiny_data_dir, tmp_path):
    return [*TINY, f"data.dir={tiny_data_dir}", f"tracking.output_dir={tmp_path / 'runs'}"]
