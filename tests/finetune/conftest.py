"""The tiny pretrained base the fast fine-tuning tests start from."""

from __future__ import annotations

from pathlib import Path

import pytest

from plinth.config.load import load_config


@pytest.fixture(scope="session")
def base_run(tiny_base, tmp_path_factory) -> Path:
    """A tiny decoder pretrained for a few steps: the base every fast test fine-tunes."""
    from plinth.recipes.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("base")
    over = [*tiny_base, "model.max_seq_len=128", "pretrain.max_steps=20",
            f"tracking.output_dir={out}", "tracking.run_name=base"]
    result = run_pretraining(load_config(["quickstart"], over), progress=False)
    return result.run_dir
