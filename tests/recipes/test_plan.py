"""The planner: memory breakdown by strategy, the largest micro-batch, throughput, warnings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plinth.cli import main
from plinth.config.load import load_config
from plinth.distributed.parallelize import apply_activation_checkpointing
from plinth.errors import UsageError
from plinth.models import build_model
from plinth.recipes.plan import GIB, make_plan, parse_bytes
from plinth.train.memory import PeakMemory, measure_peak_bytes, memory_per_device
from plinth.train.objectives import SpecialTokens, compute_loss
from plinth.train.optim import build_optimizer


def cfg(*overrides):
    return load_config([], list(overrides)).config


def test_parse_bytes():
    assert parse_bytes("80GB") == 80e9 and parse_bytes("24GiB") == 24 * GIB
    assert parse_bytes("512m") == 512e6
    with pytest.raises(UsageError, match="80GB or 24GiB"):
        parse_bytes("lots")


def test_memory_breakdown_is_16_bytes_per_parameter_plus_activations():
    c = cfg("preset=large")
    mem = memory_per_device(c, micro_batch=1)
    n = c.model.param_count()
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (4 * n, 4 * n, 8 * n)
    fsdp = memory_per_device(c, micro_batch=1, devices=8, strategy="fsdp")
    assert fsdp["optimizer"] == 8 * n / 8 and fsdp["activations"] == mem["activations"]
    ckpt = memory_per_device(cfg("preset=large", "hardware.activation_checkpointing=true"), 1)
    assert ckpt["activations"] < mem["activations"] / 5
    # autocast halves the block tensors but the residual stream and norm statistics stay fp32
    bf16 = memory_per_device(cfg("preset=large", "hardware.precision=bf16"), 1)
    assert 0.5 * mem["activations"] < bf16["activations"] < 0.7 * mem["activations"]


def test_measure_peak_bytes_counts_live_storage():
    lin = nn.Linear(100, 10)  # 1010 fp32 parameters exist before and count from the start

    def fn():
        a = torch.empty(1000)  # 4000 bytes
        a.view(10, 100).add_(1)  # a view and an in-place op: the same storage
        del a
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes, after a is gone
        c = b * 2  # 4000 more while b lives
        del b, c

    assert measure_peak_bytes(fn, lin) == 4 * 1010 + 8000
    with PeakMemory() as mem:
        x = torch.zeros(256)
        y = x + 1
        del y
    assert (mem.peak, mem.current) == (2048, 1024)


# (name, overrides): small enough for seconds on 2 cores, big enough that activations are
# most of the step's memory; two micro-batches per step, as the loop runs them when
# global_batch > micro_batch (gradients of the first exist while the second runs)
MEASURED = [
    (
        "decoder",
        ["model.d_model=128", "model.n_heads=4", "model.n_layers=2", "model.max_seq_len=256"],
        8,
    ),
    (
        "decoder-checkpointed",
        [
            "model.d_model=128",
            "model.n_heads=4",
            "model.n_layers=3",
            "model.max_seq_len=256",
            "hardware.activation_checkpointing=true",
        ],
        16,
    ),
    (
        "encoder-wide",
        [
            "model.arch=encoder",
            "model.d_model=256",
            "model.n_heads=4",
            "model.n_layers=3",
            "model.max_seq_len=256",
            "model.activation=gelu",
            "model.norm=layernorm",
        ],
        8,
    ),
    (
        "decoder-bf16",
        [
            "model.d_model=128",
            "model.n_heads=4",
            "model.n_layers=2",
            "model.max_seq_len=128",
            "hardware.precision=bf16",
        ],
        4,
    ),
]


@pytest.mark.parametrize("name,overrides,micro", MEASURED, ids=[m[0] for m in MEASURED])
def test_estimate_is_within_15_percent_of_a_measured_training_step(name, overrides, micro):
    torch.manual_seed(0)
    c = cfg(*overrides, "model.vocab_size=4096", f"optim.micro_batch={micro}")
    model = build_model(c.model)
    if c.hardware.activation_checkpointing:
        apply_activation_checkpointing(model)
    optimizer = build_optimizer(model, c.optim)
    special = SpecialTokens(eos_id=0, pad_id=1, mask_id=2)
    objective = "mlm" if c.model.arch == "encoder" else "clm"
    bf16 = c.hardware.precision == "bf16"
    held = {}  # the last loss lives on into the next forward, as in the training loop

    def step(accum=2):
        for _ in range(accum):
            batch = torch.randint(3, c.model.vocab_size, (micro, c.model.max_seq_len + 1))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                held["out"] = compute_loss(objective, model, batch, special)
            (held["out"].loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step creates AdamW's moments
    measured = measure_peak_bytes(step, model, optimizer)
    est = memory_per_device(c, micro)
    total = sum(est.values())
    assert est["activations"] + est["logits"] > total / 2  # the activation formula is tested
    print(f"{name}: estimate {total:,.0f} B, measured {measured:,.0f} B, {total / measured:.3f}")
    assert abs(total - measured) / measured < 0.15, (name, total, measured, est)


def test_7b_needs_sharding_on_h100s():
    c = cfg(
        "preset=large",
        "optim.micro_batch=1",
        "hardware.precision=bf16",
        "hardware.activation_checkpointing=true",
        "optim.lr=3e-4",
    )
    single = make_plan(c, devices=8, gpu="h100", strategy="ddp")
    assert not single.fits and "will not fit" in single.warnings[0]
    assert "--strategy fsdp" in single.warnings[0]
    sharded = make_plan(c, devices=8, gpu="h100", strategy="fsdp")
    assert sharded.fits and sharded.largest_micro_batch >= 1
    assert sharded.params == c.model.param_count() == 6_738_415_616
    # throughput = devices * peak * MFU / flops per token, from the model's own formula
    matmul_weights = sharded.params - 32000 * 4096 - (2 * 32 + 1) * 4096  # minus embedding, norms
    flops = 6 * matmul_weights + 12 * 32 * 4096 * 4096
    assert sharded.flops_per_token == pytest.approx(flops, rel=1e-9)
    assert sharded.tokens_per_s == pytest.approx(8 * 989e12 * 0.40 / flops)
    assert sharded.optimal_tokens == 20 * sharded.params


def test_flops_match_a_real_model():
    c = cfg("model.arch=encoder_decoder", "model.n_layers=2", "model.d_model=64", "model.n_heads=4")
    plan = make_plan(c, cpu_peak=1e11)
    model = build_model(c.model)
    assert plan.flops_per_token == model.flops_per_token(c.model.max_seq_len)
    assert plan.params == model.num_params()
    assert plan.tokens_per_s == pytest.approx(1e11 * 0.70 / plan.flops_per_token)


def test_largest_micro_batch_is_the_largest_power_of_two_that_fits():
    c = cfg("preset=small")
    plan = make_plan(c, gpu="l4")
    b = plan.largest_micro_batch
    fits = lambda m: sum(memory_per_device(c, m).values()) <= 0.9 * 24e9  # noqa: E731
    assert b >= 1 and fits(b) and not fits(2 * b)


def test_batch_split_like_pretrain_unusual_lr_and_undertrained():
    c = cfg("optim.global_batch=8", "optim.micro_batch=8", "optim.lr=0.5", "pretrain.max_steps=10")
    plan = make_plan(c, devices=4, cpu_peak=1e11)
    # pretrain lowers micro_batch to 2 (4 devices x 2 = the global batch of 8): plan agrees
    assert plan.micro_batch == 2 and c.optim.micro_batch == 8  # the config is not changed
    assert plan.memory == memory_per_device(c, 2, 4, "ddp")
    assert "lowered from 8 to 2" in plan.notes[0] and "global batch of 8" in plan.notes[0]
    w = " | ".join(plan.warnings)
    assert "optim.lr=0.5 is unusual" in w and "undertrained" in w
    # a global batch no split keeps is refused as pretrain refuses it
    with pytest.raises(UsageError, match="does not split evenly over 3 processes"):
        make_plan(c, devices=3, cpu_peak=1e11)


def test_plan_command(capsys):
    assert main(["plan", "quickstart"]) == 0
    out = capsys.readouterr().out
    assert "memory per device" in out and "largest micro-batch" in out and "tokens/s" in out
    code = main(
        [
            "plan",
            "quickstart",
            "preset=large",
            "model.max_seq_len=4096",
            "--gpu",
            "l4",
            "--devices",
            "2",
        ]
    )
    assert code == 1 and "will not fit" in capsys.readouterr().out
    assert main(["plan", "quickstart", "--gpu", "tpu9"]) == 2
    assert "unknown --gpu 'tpu9'" in capsys.readouterr().err
