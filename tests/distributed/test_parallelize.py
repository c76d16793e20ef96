"""Efficiency switches applied from outside the model change speed/memory, not results."""

from __future__ import annotations

import copy

import pytest
import torch

from plinth.config.load import load_config
from plinth.distributed.device import autocast_context
from plinth.distributed.parallelize import apply_activation_checkpointing, parallelize
from plinth.models import build_model
from plinth.train.objectives import SpecialTokens, compute_loss

SPECIAL = SpecialTokens(eos_id=0, pad_id=1, mask_id=2, bos_id=3, sentinel_ids=list(range(60, 64)))


def tiny(arch="decoder", **extra):
    overrides = [
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "model.vocab_size=64",
        "model.max_seq_len=16",
        f"model.arch={arch}",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config([], overrides).config


def loss_and_grads(model, cfg, batch):
    model.zero_grad()
    out = compute_loss(
        cfg.objective, model, batch, SPECIAL, generator=torch.Generator().manual_seed(0)
    )
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
def test_activation_checkpointing_gives_identical_loss_and_gradients(arch):
    cfg = tiny(arch)
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ckpt = copy.deepcopy(plain)
    n = apply_activation_checkpointing(ckpt)
    assert n == (2 if arch != "encoder_decoder" else 4)
    assert [k for k, _ in ckpt.named_parameters()] == [k for k, _ in plain.named_parameters()]
    batch = torch.randint(4, 60, (3, 17))
    la, ga = loss_and_grads(plain, cfg, batch)
    lb, gb = loss_and_grads(ckpt, cfg, batch)
    assert torch.equal(la, lb)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_on_cpu_trains_close_to_fp32():
    cfg = tiny(**{"hardware.precision": "bf16", "hardware.device": "cpu"})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = torch.randint(4, 60, (3, 17))
    with autocast_context(cfg, torch.device("cpu")):
        logits = model(batch[:, :-1])
        bf16 = compute_loss("clm", model, batch, SPECIAL).loss
    assert logits.dtype == torch.bfloat16
    fp32 = compute_loss("clm", model, batch, SPECIAL).loss
    assert torch.isfinite(bf16) and abs(bf16.item() - fp32.item()) < 0.05
    bf16.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # master weights fp32


@pytest.mark.slow
def test_compiled_model_matches_eager():
    cfg = tiny(**{"hardware.compile": True})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    compiled = parallelize(model, cfg)
    batch = torch.randint(4, 60, (3, 17))
    eager = compute_loss("clm", model, batch, SPECIAL).loss
    fast = compute_loss("clm", compiled, batch, SPECIAL).loss
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
    assert compiled is not model and compiled.state_dict().keys() != model.state_dict().keys()
