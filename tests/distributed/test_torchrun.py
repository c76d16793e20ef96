"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 reproduce one process with the same
global batch, and checkpoints move between world sizes and strategies."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launcher import EXACT, launch, losses, write_config
from safetensors.torch import load_file

from plinth.config.load import load_config
from plinth.errors import PlinthError
from plinth.models import build_model
from plinth.recipes.pretrain import run_pretraining
from plinth.track.run import read_jsonl
from plinth.train import state as ckpt

TOL = 1e-5  # float reassociation across ranks; a wrong batch split differs by ~1e-2


def assert_same_curve(a: dict[int, float], b: dict[int, float], steps, tol=TOL) -> None:
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst < tol, {s: (a[s], b[s]) for s in steps}


@pytest.fixture
def tiny_yaml(tiny_overrides, tmp_path):
    return write_config(tiny_overrides, tmp_path / "tiny.yaml")


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory):
    """One process, 20 steps, global batch 8 (micro 2 x accum 4): the curve to reproduce."""
    out = tmp_path_factory.mktemp("ref")
    r = load_config(
        [],
        [
            *tiny_base,
            *EXACT,
            f"tracking.output_dir={out}",
            "pretrain.max_steps=20",
            "tracking.run_name=ref",
        ],
    )
    result = run_pretraining(r, progress=False)
    return losses(result.run_dir), losses(result.run_dir, "val/loss")


CKPT = "hardware.activation_checkpointing=true"


@pytest.mark.parametrize(
    ("strategy", "extra", "tol"),
    [
        ("ddp", [], TOL),
        ("fsdp", [], TOL),
        ("hsdp", ["distributed.shard_size=1"], TOL),  # 2 replicas x 1 shard
        ("ddp", [CKPT], TOL),
        # bf16 parameters under FSDP's policy: close to fp32, but visibly not fp32
        ("fsdp", [CKPT, "hardware.precision=bf16"], 0.05),
        pytest.param("fsdp", [CKPT, "hardware.compile=true"], TOL, marks=pytest.mark.slow),
        pytest.param("ddp", ["hardware.compile=true"], TOL, marks=pytest.mark.slow),
    ],
)
def test_two_ranks_match_one_process(tiny_yaml, tmp_path, reference, strategy, extra, tol):
    proc = launch(
        2,
        [
            tiny_yaml,
            "pretrain.max_steps=20",
            f"distributed.strategy={strategy}",
            "tracking.run_name=two",
            *extra,
            "--quiet",
        ],
    )
    run = tmp_path / "runs" / "two"
    ref_train, ref_val = reference
    assert_same_curve(losses(run), ref_train, range(1, 21), tol)
    assert_same_curve(losses(run, "val/loss"), ref_val, (10, 20), tol)
    if tol > TOL:  # mixed precision really ran in bf16
        assert max(abs(losses(run)[s] - ref_train[s]) for s in range(1, 21)) > 1e-6
    # only rank 0 wrote and printed
    assert proc.stdout.count("run directory:") == 1 and proc.stdout.count("trained 20 steps") == 1
    events = read_jsonl(run / "events.jsonl")
    start = [e for e in events if e["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["strategy"] == strategy
    assert [e["event"] for e in events].count("checkpoint") == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed"]["strategy"] == strategy
    assert manifest["distributed"]["accum_steps"] == 2  # 8 sequences = 2 ranks x 2 x 2
    last = run / "checkpoints" / "step_0000020"
    if strategy == "ddp":
        assert not (last / "sharded").exists()
    else:  # DCP shards from both ranks, and the single-file export at the end
        assert {p.name for p in (last / "sharded").iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
        assert not (run / "checkpoints" / "step_0000010" / "model.safetensors").exists()
    weights = load_file(last / "model.safetensors")
    assert weights["layers.0.attn.q_proj.weight"].shape == (64, 64)
    if strategy != "ddp":  # the consolidated file holds exactly what the shards hold
        shards_only = tmp_path / "shards_only"
        shutil.copytree(last, shards_only, ignore=shutil.ignore_patterns("model.safetensors"))
        model = build_model(load_config([run / "config.yaml"]).config.model)
        ckpt.load_checkpoint(shards_only, check=False).load_into(model)
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_fsdp_two_ranks_resume_on_one_and_back(tiny_yaml, tmp_path, reference):
    ref_train, _ = reference
    runs = tmp_path / "runs"
    # 2 ranks (fsdp) for 10 steps -> 1 process continues to 20
    launch(
        2,
        [
            tiny_yaml,
            "pretrain.max_steps=10",
            "distributed.strategy=fsdp",
            "tracking.run_name=a",
            "--quiet",
        ],
    )
    proc = launch(1, ["--resume", str(runs / "a"), "pretrain.max_steps=20", "--quiet"])
    assert "written by 2 process(es), this job has 1" in proc.stdout
    assert_same_curve(losses(runs / "a"), ref_train, range(1, 21))
    # 1 process for 10 steps -> 2 ranks (fsdp) continue to 20
    launch(
        1,
        [
            tiny_yaml,
            "pretrain.max_steps=10",
            "distributed.strategy=fsdp",
            "tracking.run_name=b",
            "--quiet",
        ],
    )
    launch(2, ["--resume", str(runs / "b"), "pretrain.max_steps=20", "--quiet"])
    assert_same_curve(losses(runs / "b"), ref_train, range(1, 21))
    ckpts = runs / "b" / "checkpoints"
    assert (ckpts / "step_0000020" / "sharded").is_dir()
    # a lost shard: fall back to the previous checkpoint, then a clear error when none is left
    (ckpts / "step_0000020" / "sharded" / "__1_0.distcp").unlink()
    loaded = ckpt.load_latest(ckpts)
    assert loaded.path.name == "step_0000010"
    assert "sharded/__1_0.distcp is missing" in loaded.skipped[0][1]
    shutil.rmtree(ckpts / "step_0000010")
    with pytest.raises(PlinthError, match=r"no usable checkpoint.*__1_0.distcp is missing"):
        ckpt.load_latest(ckpts)


@pytest.mark.slow
def test_hybrid_sharding_on_a_2x2_mesh(tiny_yaml, tmp_path, reference):
    """4 ranks: shard within pairs, replicate across the two pairs."""
    launch(
        4,
        [
            tiny_yaml,
            "pretrain.max_steps=20",
            "distributed.strategy=hsdp",
            "distributed.shard_size=2",
            "tracking.run_name=h",
            "--quiet",
        ],
    )
    assert_same_curve(losses(tmp_path / "runs" / "h"), reference[0], range(1, 21))
