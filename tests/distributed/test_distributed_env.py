"""torchrun's environment, strategy resolution and the refusals that come with them."""

from __future__ import annotations

import pytest
import torch

from plinth.config.load import load_config
from plinth.distributed.env import DistEnv, check_strategy, hsdp_shape, resolve_strategy
from plinth.errors import NotSupportedError, UsageError
from plinth.recipes.pretrain import run_pretraining

CPU = torch.device("cpu")


def cfg(*overrides):
    return load_config([], list(overrides)).config


def test_environment_from_torchrun_variables():
    env = DistEnv.from_environ(
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.distributed and not env.is_main
    plain = DistEnv.from_environ({})
    assert plain == DistEnv() and plain.is_main and not plain.distributed
    with pytest.raises(UsageError, match="must be integers"):
        DistEnv.from_environ({"WORLD_SIZE": "two"})
    with pytest.raises(UsageError, match="RANK=4 is outside WORLD_SIZE=4"):
        DistEnv.from_environ({"RANK": "4", "WORLD_SIZE": "4"})


def test_strategy_resolution():
    two = DistEnv(rank=0, world_size=2, local_world_size=2)
    assert resolve_strategy(cfg(), two) == "ddp"  # auto
    assert resolve_strategy(cfg("distributed.strategy=fsdp"), two) == "fsdp"
    # one process trains unwrapped whatever the config says, so a sharded run resumes on one
    assert resolve_strategy(cfg("distributed.strategy=fsdp"), DistEnv()) == "none"
    eight = DistEnv(rank=0, world_size=8, local_world_size=4)
    assert hsdp_shape(cfg("distributed.strategy=hsdp"), eight) == (2, 4)  # a node per replica
    assert hsdp_shape(cfg("distributed.shard_size=2"), eight) == (4, 2)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["distributed.strategy=none"], UsageError, "each would train its own copy"),
        (["distributed.backend=nccl"], NotSupportedError, "nccl needs CUDA GPUs"),
        (
            ["distributed.strategy=fsdp", "optim.name=muon"],
            NotSupportedError,
            "Muon orthogonalises whole weight matrices",
        ),
        (
            ["distributed.strategy=hsdp", "distributed.shard_size=3"],
            UsageError,
            "shard_size=3 does not divide the world size 4",
        ),
    ],
)
def test_unsupported_combinations_are_refused(overrides, error, message):
    with pytest.raises(error, match=message):
        check_strategy(cfg(*overrides), DistEnv(0, 4, 0, 4), CPU)


def test_world_size_must_divide_the_global_batch(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    r = load_config([], [*tiny_overrides, "pretrain.max_steps=2"])  # global 8, micro 4
    with pytest.raises(UsageError) as e:
        run_pretraining(r, progress=False)
    text = str(e.value)
    assert "global batch of 8 sequences does not split evenly over 3 processes" in text
    assert "torchrun started 3 processes" in text and "optim.global_batch" in text
    assert not (tmp_path / "runs").exists()  # refused before anything was written
