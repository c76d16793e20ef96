"""End to end: every architecture learns, resume is bit-exact, bad input is explained."""

from __future__ import annotations

import math
import shutil

import pytest

from plinth.cli import main
from plinth.config.load import load_config
from plinth.errors import PlinthError, UsageError
from plinth.recipes.pretrain import run_pretraining
from plinth.track.run import read_jsonl


def train_losses(run_dir) -> dict[int, float]:
    return {
        r["step"]: r["train/loss"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if "train/loss" in r
    }


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("decoder", []),
        ("encoder", ["pretrain.mask_ratio=0.3"]),
        ("encoder_decoder", ["model.n_decoder_layers=1"]),
    ],
)
def test_each_architecture_trains_with_falling_loss(tiny_overrides, arch, extra):
    r = load_config(
        [],
        [
            *tiny_overrides,
            f"model.arch={arch}",
            "pretrain.max_steps=40",
            f"tracking.run_name={arch}",
            *extra,
        ],
    )
    result = run_pretraining(r, progress=False)
    losses = train_losses(result.run_dir)
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.7, (first, last)  # a clear fall, far beyond step noise
    assert math.isfinite(result.val["val/loss"]) and result.val["val/loss"] < first
    if arch == "decoder":
        assert "val/bpb" in result.val
        samples = read_jsonl(result.run_dir / "samples.jsonl")
        assert {s["step"] for s in samples} == {10, 20, 30, 40}
    logged = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "train/loss" in r]
    for r in logged:
        assert 1e-6 < r["update_ratio"] < 0.5  # Adam at lr 3e-3 moves weights ~1e-3..1e-2/step
        assert r["step_time_p50"] <= r["step_time_p90"] <= r["step_time_max"]
        assert 0 < r["data_share"] < 1 and r["tokens_per_s"] > 0 and r["mfu"] > 0
    events = [e["event"] for e in read_jsonl(result.run_dir / "events.jsonl")]
    assert events[0] == "start" and events[-1] == "end" and events.count("checkpoint") == 4


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "pretrain.max_steps=20", "model.dropout=0.1"]
    straight = run_pretraining(
        load_config([], [*common, "tracking.run_name=straight"]), progress=False
    )
    r = load_config([], [*common, "tracking.run_name=split"])
    first = run_pretraining(r, progress=False, stop_after=10)
    assert first.step == 10
    second = run_pretraining(r, run_path=first.run_dir, progress=False)
    assert second.step == 20
    a, b = train_losses(straight.run_dir), train_losses(second.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit-identical, not approximately equal
    assert straight.val["val/loss"] == second.val["val/loss"]
    assert any(e["event"] == "resume" for e in read_jsonl(second.run_dir / "events.jsonl"))


def test_resume_falls_back_past_a_truncated_checkpoint(tiny_overrides, capsys):
    r = load_config(
        [],
        [
            *tiny_overrides,
            "pretrain.max_steps=30",
            "tracking.run_name=trunc",
            "tracking.keep_last=3",
        ],
    )
    first = run_pretraining(r, progress=False, stop_after=20)
    latest = first.run_dir / "checkpoints" / "step_0000020" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    second = run_pretraining(r, run_path=first.run_dir, progress=False)
    out = capsys.readouterr().out
    assert "skipping checkpoint step_0000020 (model.safetensors is truncated" in out
    assert second.step == 30
    events = read_jsonl(first.run_dir / "events.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["checkpoint"] == "step_0000010"


def test_resume_errors_are_explained(tiny_overrides, tmp_path, capsys):
    assert main(["pretrain", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "notarun").mkdir()
    assert main(["pretrain", "--resume", str(tmp_path / "notarun")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    r = load_config([], [*tiny_overrides, "pretrain.max_steps=10", "tracking.run_name=cfg"])
    run = run_pretraining(r, progress=False).run_dir
    code = main(["pretrain", "--resume", str(run), "model.d_model=128", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "model.d_model: 64 -> 128" in err
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    assert main(["pretrain", "--resume", str(run), "pretrain.max_steps=20", "--quiet"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err


def test_dataset_shorter_than_one_batch(tiny_overrides, tmp_path):
    from plinth.data import PackedLoader, open_dataset, prepare_dataset

    overrides = [*tiny_overrides, "data.max_docs=2", f"data.dir={tmp_path / 'two-docs'}"]
    ds = open_dataset(prepare_dataset(load_config([], overrides).config, progress=False))
    rows = len(PackedLoader(ds, "train", seq_len=32, batch_size=1, seed=0)) + 1  # one too many
    r = load_config([], [*overrides, f"optim.micro_batch={rows}", f"optim.global_batch={rows}"])
    with pytest.raises(PlinthError, match="fewer than one micro-batch needs"):
        run_pretraining(r, progress=False)


def test_vocab_mismatch_between_tokenizer_and_model(tiny_overrides, tiny_data_dir, tmp_path):
    from plinth.data import open_dataset
    from plinth.track.run import RunDir
    from plinth.train.loop import train

    cfg = load_config([], [*tiny_overrides, "model.vocab_size=256"]).config
    ds = open_dataset(tiny_data_dir)  # its tokenizer has 512 tokens
    with pytest.raises(PlinthError, match=r"has 512 tokens but model\.vocab_size is 256"):
        train(cfg, ds, RunDir(tmp_path / "run"), progress=False)


def test_model_that_cannot_fit_says_what_would():
    import torch

    from plinth.train.memory import check_fits

    cfg = load_config([], ["preset=large"]).config
    with pytest.raises(UsageError) as e:
        check_fits(cfg, torch.device("cpu"), available=24 * 2**30)
    msg = str(e.value)
    assert "6,738.4M parameters need about" in msg
    assert "presets that fit: tiny, small, medium" in msg


def test_fit_check_is_per_rank_under_sharding():
    import torch

    from plinth.train.memory import check_fits

    cfg = load_config(
        [],
        ["preset=large", "hardware.precision=bf16", "hardware.activation_checkpointing=true",
         "optim.micro_batch=1"],
    ).config  # fmt: skip
    gpu = torch.device("cuda")  # only its type is used: no GPU needed
    with pytest.raises(UsageError, match=r"distributed\.strategy=fsdp"):
        check_fits(cfg, gpu, available=80e9)  # 7B with AdamW on one 80 GB GPU: no
    check_fits(cfg, gpu, available=80e9, devices=8, strategy="fsdp")  # sharded over 8: yes
    with pytest.raises(UsageError, match="free per rank"):
        check_fits(cfg, gpu, available=80e9, devices=8, strategy="ddp")  # replicas: no
    small = load_config([], ["preset=small"]).config
    check_fits(small, torch.device("cpu"), available=24 * 2**30)
    with pytest.raises(UsageError):  # 16 CPU ranks on one machine share its memory
        check_fits(small, torch.device("cpu"), available=24 * 2**30, devices=16, ranks_here=16)


def test_generate_from_a_trained_run(tiny_overrides, capsys):
    r = load_config([], [*tiny_overrides, "pretrain.max_steps=10", "tracking.run_name=gen"])
    run = run_pretraining(r, progress=False).run_dir
    capsys.readouterr()
    args = [
        "generate",
        str(run),
        "--prompt",
        "def ",
        "import",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    assert main(args) == 0
    out1 = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == out1 and "--- 'def '" in out1 and "--- 'import'" in out1
    assert (
        main(
            [
                "generate",
                str(run / "checkpoints" / "step_0000010"),
                "--prompt",
                "x",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert main(["generate", str(run / "metrics.jsonl")]) == 2


def test_tensorboard_sink_receives_the_loops_metrics(tiny_overrides):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = load_config(
        [],
        [
            *tiny_overrides,
            "pretrain.max_steps=10",
            "tracking.run_name=tb",
            "tracking.sinks=[jsonl, tensorboard]",
        ],
    )
    run = run_pretraining(r, progress=False).run_dir
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    jsonl = [m["train/loss"] for m in read_jsonl(run / "metrics.jsonl") if "train/loss" in m]
    assert len(losses) == 10 and losses == pytest.approx(jsonl, rel=1e-6)
    assert {"val/loss", "update_ratio", "tokens_per_s"} <= set(acc.Tags()["scalars"])
