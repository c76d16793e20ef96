"""Fitting the micro-batch to the world size (OptimConfig.fit_world): the global batch, and so
the optimizer's math, never changes; micro_batch is lowered where that keeps it, else refused."""

from __future__ import annotations

import pytest

from plinth.config.sections.train import OptimConfig


@pytest.mark.parametrize(
    ("global_batch", "micro", "world", "new_micro", "accum"),
    [
        (16, 16, 2, 8, 1),  # quickstart under torchrun --nproc_per_node=2
        (32, 8, 8, 4, 1),  # README: preset=large on 8 GPUs
        (48, 16, 2, 12, 2),  # largest divisor of the 24 per device that is <= 16
        (20, 8, 1, 5, 4),  # one process, micro_batch not dividing the global batch
        (14, 4, 2, 1, 7),  # 7 per device is prime: micro 1 keeps the batch
    ],
)
def test_micro_batch_is_lowered_to_keep_the_global_batch(global_batch, micro, world, new_micro,
                                                         accum):
    o = OptimConfig(global_batch=global_batch, micro_batch=micro)
    note = o.fit_world(seq_len=128, world_size=world)
    assert o.micro_batch == new_micro and o.accum_steps(128, world) == accum
    assert new_micro * world * accum == global_batch  # same global batch
    assert f"lowered from {micro} to {new_micro}" in note
    assert f"global batch of {global_batch} sequences" in note and "\n" not in note


def test_a_fitting_batch_is_left_alone():
    o = OptimConfig(global_batch=64, micro_batch=8)
    assert o.fit_world(256, 4) is None and o.micro_batch == 8 and o.accum_steps(256, 4) == 2
    t = OptimConfig(global_batch=16384, batch_unit="tokens", micro_batch=8)
    assert t.fit_world(256, 4) is None and t.accum_steps(256, 4) == 2


@pytest.mark.parametrize(
    ("kwargs", "world", "example"),
    [
        ({"global_batch": 8, "micro_batch": 4}, 3, "e.g. 9"),
        ({"global_batch": 5 * 128, "batch_unit": "tokens", "micro_batch": 1}, 2, "e.g. 768 tokens"),
    ],
)
def test_a_global_batch_no_split_keeps_is_refused(kwargs, world, example):
    o = OptimConfig(**kwargs)
    with pytest.raises(ValueError, match=f"over {world} processes") as e:
        o.fit_world(128, world)
    assert example in str(e.value) and "optim.global_batch" in str(e.value)
    assert o.micro_batch == kwargs["micro_batch"]  # unchanged when refused


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_shipped_recipe_splits_over_the_usual_world_sizes(repo_root, world):
    from plinth.config.load import load_config

    for path in sorted((repo_root / "configs").glob("*.yaml")):
        cfg = load_config([path]).config
        seq = cfg.finetune.max_length if cfg.finetune.base else cfg.model.max_seq_len
        optim = cfg.optim.model_copy()
        optim.fit_world(seq, world)  # raises when no micro-batch keeps the global batch
        assert optim.micro_batch * world * optim.accum_steps(seq, world) == (
            cfg.optim.sequences_per_step(seq)
        ), path.name
