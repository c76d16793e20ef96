"""Optimizers and schedules: parameter groups, exact schedule values, Muon, state round trip.

    python -m pytest tests/train/test_optim.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from plinth.config.schema import ModelConfig, OptimConfig
from plinth.models import build_model
from plinth.train.optim import Muon, build_optimizer, build_scheduler, lr_multiplier, newton_schulz


def tiny(**kw):
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16)
    base.update(kw)
    return build_model(ModelConfig(**base))


def _groups_by_id(opt):
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = tiny(bias=True, norm="layernorm", positional="learned", qk_norm=True)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    where = _groups_by_id(opt)
    assert len(where) == len(list(model.parameters()))  # every parameter exactly once
    for name, p in model.named_parameters():
        no_decay = p.ndim < 2 or name.startswith(("embed_tokens", "embed_positions"))
        assert where[id(p)]["weight_decay"] == (0.0 if no_decay else 0.1), name
    assert where[id(model.lm_head.weight)]["weight_decay"] == 0.1
    assert where[id(model.layers[0].attn.q_proj.bias)]["weight_decay"] == 0.0
    assert where[id(model.layers[0].attn.q_norm.weight)]["weight_decay"] == 0.0
    # AdamW takes the fused kernel on CPU
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True


def test_tied_head_is_an_embedding_and_frozen_parameters_are_left_out():
    model = tiny(tie_embeddings=True)
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    where = _groups_by_id(opt)
    assert where[id(model.lm_head.weight)]["weight_decay"] == 0.0
    assert not any(id(p) in where for p in model.layers[0].parameters())
    assert len(where) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_other_optimizers(name, cls):
    opt = build_optimizer(tiny(), OptimConfig(name=name, momentum=0.8, lr=0.1))
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.1
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.8


def _cfg(schedule, **kw):
    return OptimConfig(lr=1.0, schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, **kw)


@pytest.mark.parametrize(
    "schedule,total,expected",
    [
        ("constant", 110, {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 109: 1.0, 500: 1.0}),
        ("linear", 110, {0: 0.1, 9: 1.0, 10: 1.0, 60: 0.55, 85: 0.325, 110: 0.1, 300: 0.1}),
        ("cosine", 110, {0: 0.1, 9: 1.0, 10: 1.0, 35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                         60: 0.55, 110: 0.1, 300: 0.1}),
        # wsd: decay over the last 20% (steps 80..100) linearly to 0.1
        ("wsd", 100, {0: 0.1, 9: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 95: 0.325, 100: 0.1}),
    ],
)
def test_schedule_values(schedule, total, expected):
    cfg = _cfg(schedule, decay_frac=0.2)
    for step, value in expected.items():
        assert lr_multiplier(step, cfg, total) == pytest.approx(value, abs=1e-12), step


def test_scheduler_drives_the_optimizer_lr():
    cfg = OptimConfig(lr=0.5, schedule="cosine", warmup_steps=4, min_lr_ratio=0.0)
    model = tiny()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    seen = []
    for _ in range(21):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])
    assert seen[12] == pytest.approx(0.25)  # halfway through the cosine
    assert seen[20] == pytest.approx(0.0)
    assert {g["lr"] for g in opt.param_groups} == {opt.param_groups[0]["lr"]}


def test_no_warmup_starts_at_peak():
    assert lr_multiplier(0, OptimConfig(warmup_steps=0, schedule="cosine"), 100) == 1.0


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        # singular values spread over two decades
        g = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 1, shape[1]))
        o = newton_schulz(g)
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.25, s  # all pushed into a band around 1
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh  # the exact orthogonalisation
        cos = (o * polar).sum() / (o.norm() * polar.norm())
        assert cos > 0.97


def test_muon_groups_and_loss_falls():
    torch.manual_seed(0)
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=3e-3, weight_decay=0.0))
    assert isinstance(opt, Muon)
    where = _groups_by_id(opt)
    assert where[id(model.layers[0].attn.q_proj.weight)]["use_muon"]
    assert where[id(model.layers[1].mlp.down_proj.weight)]["use_muon"]
    for p in (model.embed_tokens.weight, model.lm_head.weight, model.norm.weight):
        assert not where[id(p)]["use_muon"]
    x = torch.randint(0, 64, (8, 17))
    losses = []
    for _ in range(30):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_muon_update_size_matches_adamw_rms():
    """One Muon step moves a matrix by lr * 0.2 * sqrt(max dim) * NS(g): RMS ~0.2 * lr."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(128, 64))
    opt = Muon([{"params": [w], "use_muon": True}], lr=1e-2, momentum=0.0, nesterov=False)
    before = w.detach().clone()
    w.grad = torch.randn(128, 64)
    opt.step()
    rms = (w.detach() - before).pow(2).mean().sqrt().item()
    # NS output has singular values ~1 on 64 directions: RMS = sqrt(64 / (128*64)) ~ 0.088
    assert rms == pytest.approx(1e-2 * 0.2 * math.sqrt(128) * math.sqrt(1 / 128), rel=0.25)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "muon"])
def test_state_dict_round_trip_continues_identically(name):
    torch.manual_seed(0)
    cfg = OptimConfig(name=name, lr=1e-2, warmup_steps=2, schedule="cosine")
    x = torch.randint(0, 64, (4, 9))

    def train(model, opt, sched, steps):
        for _ in range(steps):
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    a = tiny()
    opt_a = build_optimizer(a, cfg)
    sched_a = build_scheduler(opt_a, cfg, 10)
    train(a, opt_a, sched_a, 3)
    saved = copy.deepcopy((a.state_dict(), opt_a.state_dict(), sched_a.state_dict()))

    b = tiny()  # different random init, then restored
    b.load_state_dict(saved[0])
    opt_b = build_optimizer(b, cfg)
    sched_b = build_scheduler(opt_b, cfg, 10)  # before loading: LambdaLR() resets group lrs
    opt_b.load_state_dict(saved[1])
    sched_b.load_state_dict(saved[2])
    train(a, opt_a, sched_a, 3)
    train(b, opt_b, sched_b, 3)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


def test_muon_finds_the_head_through_a_compile_wrapper():
    model = tiny()
    opt = build_optimizer(torch.compile(model), OptimConfig(name="muon"))
    where = _groups_by_id(opt)
    assert not where[id(model.lm_head.weight)]["use_muon"]
    assert where[id(model.layers[0].attn.o_proj.weight)]["use_muon"]
