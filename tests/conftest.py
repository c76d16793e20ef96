"""Shared fixtures. Tests run on CPU with few threads so the suite behaves the same everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from plinth.config.load import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def write_yaml(tmp_path):
    """Write a YAML text to tmp_path/name and return the path."""

    def _write(text: str, name: str = "cfg.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p

    return _write


# A tiny prepared corpus shared by the end-to-end recipe and torchrun tests (prepared once).
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


@pytest.fixture(scope="session")
def tiny_base(tiny_data_dir) -> list[str]:
    """TINY plus the prepared data (no output directory): for session/module fixtures."""
    return [*TINY, f"data.dir={tiny_data_dir}"]


@pytest.fixture(scope="session")
def base_run(tiny_base, tmp_path_factory) -> Path:
    """A tiny decoder pretrained for a few steps: the base every fast fine-tuning and alignment
    test starts from."""
    from plinth.recipes.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("base")
    over = [*tiny_base, "model.max_seq_len=128", "pretrain.max_steps=20",
            f"tracking.output_dir={out}", "tracking.run_name=base"]
    result = run_pretraining(load_config(["quickstart"], over), progress=False)
    return result.run_dir
